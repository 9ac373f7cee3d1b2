package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
)

// dbProxy forwards TCP connections to PostgreSQL. It can cut every
// connection and refuse new ones, stall them (accept and forward nothing),
// and restore itself.
type dbProxy struct {
	t       *testing.T
	network string // of the database
	target  string
	addr    string // where the proxy listens

	mu      sync.Mutex
	ln      net.Listener
	conns   map[net.Conn]bool
	stalled bool
}

// newDBProxy starts a proxy to the test database and returns it with a
// connection URL that goes through it to a fresh schema.
func newDBProxy(t *testing.T) (*dbProxy, string) {
	t.Helper()
	databaseURL, _ := newSchema(t)
	cfg, err := pq.NewConfig(databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	p := &dbProxy{t: t, network: "tcp", target: net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))), conns: map[net.Conn]bool{}}
	if strings.HasPrefix(cfg.Host, "/") {
		p.network, p.target = "unix", fmt.Sprintf("%s/.s.PGSQL.%d", cfg.Host, cfg.Port)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	p.serve(ln)
	t.Cleanup(p.cut)
	return p, viaProxy(t, databaseURL, p.addr)
}

// viaProxy points databaseURL at addr.
func viaProxy(t *testing.T, databaseURL, addr string) string {
	host, port, _ := net.SplitHostPort(addr)
	if u, err := url.Parse(databaseURL); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		u.Host = addr
		q := u.Query()
		q.Del("host")
		q.Del("port")
		u.RawQuery = q.Encode()
		return u.String()
	}
	return databaseURL + " host=" + host + " port=" + port
}

func (p *dbProxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			go p.forward(client)
		}
	}()
}

func (p *dbProxy) forward(client net.Conn) {
	server, err := net.Dial(p.network, p.target)
	if err != nil {
		client.Close()
		return
	}
	p.mu.Lock()
	p.conns[client], p.conns[server] = true, true
	p.mu.Unlock()
	pipe := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if err != nil {
				break
			}
			p.mu.Lock()
			stalled := p.stalled
			p.mu.Unlock()
			if stalled {
				continue // the network eats it
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				break
			}
		}
		client.Close()
		server.Close()
	}
	go pipe(server, client)
	go pipe(client, server)
}

// cut closes every proxied connection and refuses new ones.
func (p *dbProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
}

// stall makes the proxy swallow everything in both directions, as a
// network that stops answering does.
func (p *dbProxy) stall(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stalled = on
}

// restore accepts connections again, on the same address.
func (p *dbProxy) restore() {
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", p.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		p.t.Fatalf("proxy: listen again on %s: %v", p.addr, err)
	}
	p.serve(ln)
}

// clientWithTimeout gives up on an answer after a time far beyond the bound
// the service sets itself, so a hang fails the test instead of stalling it.
var clientWithTimeout = &http.Client{Timeout: 20 * time.Second}

// everyUsersRoute is one request to each /users route.
func everyUsersRoute(id int64) []struct{ method, path, body string } {
	return []struct{ method, path, body string }{
		{"POST", "/users/", userBody("Down", "Time", "down@example.com", "password1")},
		{"POST", "/users", userBody("Down", "Time", "down@example.com", "password1")},
		{"GET", "/users/", ""},
		{"GET", "/users", ""},
		{"GET", fmt.Sprintf("/users/%d", id), ""},
		{"PUT", fmt.Sprintf("/users/%d", id), `{"first_name":"Changed"}`},
		{"DELETE", fmt.Sprintf("/users/%d", id), ""},
	}
}

// outcome is one create's result, for matching against the table after.
type outcome struct {
	email      string
	status     int
	start, end time.Time
}

func TestDatabaseCutUnderLoad(t *testing.T) {
	t.Parallel()
	proxy, databaseURL := newDBProxy(t)
	st, err := openStore(context.Background(), databaseURL, testPool, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	e := newTestEnv(t, withStore(st))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")

	// Load: creates of fresh addresses, and reads, until told to stop.
	stop := make(chan struct{})
	var mu sync.Mutex
	var outcomes []outcome
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				email := fmt.Sprintf("load%d-%d@example.com", w, i)
				start := time.Now()
				status := post(t, e.url+"/users/", userBody("Load", "Test", email, "password1"))
				mu.Lock()
				outcomes = append(outcomes, outcome{email, status, start, time.Now()})
				mu.Unlock()
				if w == 0 {
					e.do("GET", fmt.Sprintf("/users/%d", u.ID), "")
				}
			}
		}(w)
	}
	time.Sleep(300 * time.Millisecond)
	cutAt := time.Now()
	proxy.cut()
	cutDone := time.Now()

	// While it is down, every route says so, within its bound.
	for _, rq := range everyUsersRoute(u.ID) {
		mustError(t, e.do(rq.method, rq.path, rq.body), http.StatusServiceUnavailable, "Service unavailable")
	}
	mustError(t, e.do("GET", "/healthz", ""), http.StatusServiceUnavailable, "Service unavailable")
	time.Sleep(200 * time.Millisecond)

	proxy.restore()
	// It recovers by itself.
	recovered := false
	for i := 0; i < 200 && !recovered; i++ {
		recovered = e.do("GET", "/healthz", "").status == http.StatusOK
		time.Sleep(25 * time.Millisecond)
	}
	if !recovered {
		t.Fatal("/healthz did not come back within 5s of the database")
	}
	time.Sleep(200 * time.Millisecond) // load on a healthy database again
	close(stop)
	wg.Wait()
	mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK)
	e.createUser(t, "After", "Wards", "after@example.com", "password1")

	stored := map[string]bool{}
	rows, err := adminDB.Query(`SELECT email FROM ` + schemaOf(t, st) + `.users`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var email string
		rows.Scan(&email)
		stored[email] = true
	}
	var created, unavailable, inFlight int
	for _, o := range outcomes {
		switch o.status {
		case http.StatusCreated:
			created++
			if !stored[o.email] {
				t.Errorf("create of %s answered 201 but no row exists", o.email)
			}
		case http.StatusServiceUnavailable:
			unavailable++
			// A create in flight when the connection was cut may have
			// committed just before: its answer was lost with the
			// connection, and no service can know. Any other error must
			// have left nothing.
			if o.start.Before(cutDone) && o.end.After(cutAt) {
				inFlight++
				continue
			}
			if stored[o.email] {
				t.Errorf("create of %s answered 503 but left a row", o.email)
			}
		default:
			t.Errorf("create of %s answered %d, want 201 or 503", o.email, o.status)
		}
	}
	t.Logf("%d creates: %d created, %d unavailable (%d of them in flight at the cut)", len(outcomes), created, unavailable, inFlight)
	if created == 0 || unavailable == 0 {
		t.Errorf("the load saw %d creates and %d outages: the cut did not happen under load", created, unavailable)
	}
}

// post creates a user and returns the status, failing on a client error.
func post(t *testing.T, url, body string) int {
	resp, err := clientWithTimeout.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Errorf("POST %s: %v", url, err)
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// schemaOf returns the schema a store works in.
func schemaOf(t *testing.T, st *store) string {
	t.Helper()
	var schema string
	if err := st.db.QueryRow(`SELECT current_schema()`).Scan(&schema); err != nil {
		t.Fatal(err)
	}
	return schema
}

func TestDatabaseStallIsBounded(t *testing.T) {
	t.Parallel()
	proxy, databaseURL := newDBProxy(t)
	st, err := openStore(context.Background(), databaseURL, testPool, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	e := newTestEnv(t, withStore(st))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")

	proxy.stall(true)
	for _, rq := range everyUsersRoute(u.ID) {
		start := time.Now()
		r := e.do(rq.method, rq.path, rq.body)
		mustError(t, r, http.StatusServiceUnavailable, "Service unavailable")
		// The bound is 300 ms: ten times that is not a timing, it is a hang.
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("%s answered 503 only after %v", r.what, d)
		}
	}
	mustError(t, e.do("GET", "/healthz", ""), http.StatusServiceUnavailable, "Service unavailable")
	proxy.stall(false)
	proxy.cut() // drop the stalled connections
	proxy.restore()
	for i := 0; i < 200; i++ {
		if e.do("GET", "/healthz", "").status == http.StatusOK {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
		t.Errorf("after the stall: %+v, want %+v", got, u)
	}
}

func TestDatabaseGoneAtStart(t *testing.T) {
	t.Parallel()
	// A server that accepts connections and never answers: only a connect
	// timeout gets the service out.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	}()
	env := map[string]string{"DATABASE_URL": "postgres://" + ln.Addr().String() + "/db?sslmode=disable", "ADDR": "127.0.0.1:0"}
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		done <- run(context.Background(), nil, func(k string) string { return env[k] }, io.Discard, io.Discard)
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "DATABASE_URL") || !strings.Contains(err.Error(), ln.Addr().String()) {
			t.Errorf("run = %v, want an error naming DATABASE_URL and %s", err, ln.Addr())
		}
		t.Logf("gave up after %v: %v", time.Since(start).Round(time.Millisecond), err)
	case <-time.After(20 * time.Second):
		t.Fatal("run still waiting for a silent database after 20s")
	}
}

func TestInternalErrorsAreGeneric(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	// A fault on the server's side: the table is not what the code expects.
	if _, err := e.store.db.Exec(`ALTER TABLE users RENAME COLUMN first_name TO given_name`); err != nil {
		t.Fatal(err)
	}
	for _, rq := range everyUsersRoute(u.ID) {
		if rq.method == "DELETE" {
			continue // DELETE does not read the renamed column
		}
		r := e.do(rq.method, rq.path, rq.body)
		mustError(t, r, http.StatusInternalServerError, "Internal server error")
		if strings.Contains(string(r.body), "first_name") || strings.Contains(string(r.body), "pq") {
			t.Errorf("%s: the answer leaks the cause: %s", r.what, r.body)
		}
	}
	if _, err := e.store.db.Exec(`ALTER TABLE users RENAME TO gone`); err != nil {
		t.Fatal(err)
	}
	mustError(t, e.do("DELETE", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusInternalServerError, "Internal server error")
	logs := e.logs.String()
	if !strings.Contains(logs, `level=ERROR msg="internal error" method=PUT path=/users/`) || !strings.Contains(logs, "given_name") && !strings.Contains(logs, "first_name") {
		t.Errorf("the log does not hold the cause with its request:\n%s", logs)
	}
	if strings.Contains(logs, "password1") {
		t.Errorf("the log holds a password:\n%s", logs)
	}
}

func TestPanicIsRecovered(t *testing.T) {
	t.Parallel()
	logs := &syncBuffer{}
	s := &server{logger: newTestLogger(logs)}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /panic", func(http.ResponseWriter, *http.Request) { panic("handler bug") })
	mux.HandleFunc("GET /half", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		w.Write([]byte(`[{"id":1},`))
		w.(http.Flusher).Flush()
		panic("failed mid-stream")
	})
	mux.HandleFunc("GET /ok", func(w http.ResponseWriter, _ *http.Request) {
		encode(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	srv := newTestHTTPServer(t, s.wrap(mux))
	e := &testEnv{t: t, url: srv}

	mustError(t, e.do("GET", "/panic", ""), http.StatusInternalServerError, "Internal server error")
	if r := e.do("GET", "/ok", ""); r.status != http.StatusOK {
		t.Errorf("%s after a panic, want 200: the process keeps serving", r)
	}
	// A panic after the answer started cannot change the status: the
	// connection is cut so the client sees a broken response.
	resp, err := http.Get(srv + "/half")
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Errorf("GET /half: the client got a complete response from a handler that panicked mid-stream")
	}
	out := logs.String()
	for _, want := range []string{`msg=panic method=GET pattern="GET /panic" panic="handler bug" stack=`, "faults_test.go", `pattern="GET /panic" status=500`, `panic="failed mid-stream"`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

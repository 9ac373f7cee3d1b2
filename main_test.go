package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
	"golang.org/x/crypto/bcrypt"
)

// The tests run against a real PostgreSQL: TEST_DATABASE_URL, or the same
// default the service uses. Each test gets a schema of its own in that
// database, created through openStore as in production and dropped after.

func testDatabaseURL() string {
	if u := os.Getenv("TEST_DATABASE_URL"); u != "" {
		return u
	}
	return defaultDatabaseURL
}

// adminDB creates and drops the tests' schemas. TestMain opens it.
var adminDB *sql.DB

func TestMain(m *testing.M) {
	dsn, err := parseDatabaseURL(testDatabaseURL())
	db, _ := sql.Open("postgres", dsn)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = db.PingContext(ctx)
		cancel()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: these tests need PostgreSQL and none answers at %s (%v): set TEST_DATABASE_URL to a database where you may create schemas\n",
			databaseAttr(dsn).Value, err)
		os.Exit(1)
	}
	adminDB = db
	code := m.Run()
	// Only a full run that passed has produced every answer the tests make.
	if code == 0 && fullRun() && !checkAnswersDocumented(os.Stderr) {
		code = 1
	}
	db.Close()
	os.Exit(code)
}

// newSchema creates an empty schema that is dropped when the test ends, and
// returns a connection URL whose search_path is that schema.
func newSchema(t testing.TB) (databaseURL, schema string) {
	t.Helper()
	b := make([]byte, 8)
	rand.Read(b)
	schema = "test_" + hex.EncodeToString(b)
	if _, err := adminDB.Exec(`CREATE SCHEMA ` + schema); err != nil {
		t.Fatalf("create schema: %v", err)
	}
	t.Cleanup(func() {
		if _, err := adminDB.Exec(`DROP SCHEMA ` + schema + ` CASCADE`); err != nil {
			t.Errorf("drop schema %s: %v", schema, err)
		}
	})
	// A session time zone other than UTC: the service must answer in UTC
	// whatever the database's.
	return withParam(withParam(testDatabaseURL(), "search_path", schema), "TimeZone", "Asia/Kolkata"), schema
}

// withParam adds a connection parameter to a URL or key=value DSN.
func withParam(databaseURL, key, value string) string {
	if u, err := url.Parse(databaseURL); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		q := u.Query()
		q.Set(key, value)
		u.RawQuery = q.Encode()
		return u.String()
	}
	return databaseURL + " " + key + "=" + value
}

// testPool keeps each test's pool small, since tests run in parallel
// against one server.
var testPool = poolConfig{maxOpen: 8, maxIdle: 8, maxIdleTime: time.Minute}

// newTestStore opens a store on a fresh schema.
func newTestStore(t testing.TB) *store {
	t.Helper()
	databaseURL, _ := newSchema(t)
	return newStoreAt(t, databaseURL)
}

// newStoreAt opens a store at databaseURL with the tests' pool and the
// service's 5 s bound.
func newStoreAt(t testing.TB, databaseURL string) *store {
	t.Helper()
	return newStoreWith(t, databaseURL, testPool, 5*time.Second)
}

// newStoreWith opens a store at databaseURL as the service does, closed when
// the test ends. It is the tests' one way to open a store.
func newStoreWith(t testing.TB, databaseURL string, pool poolConfig, bound time.Duration) *store {
	t.Helper()
	st, err := openStore(context.Background(), databaseURL, pool, bound)
	if err != nil {
		t.Fatalf("openStore: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// testEnv is the real handler on a real database, served over HTTP.
type testEnv struct {
	t      testing.TB
	url    string
	store  *store
	hasher *hasher
	logs   *syncBuffer
	client *http.Client // nil for noRedirects, from 127.0.0.1
}

type envOption func(*envConfig)

type envConfig struct {
	apiToken  string
	hasher    *hasher
	store     *store
	configure func(*http.Server)
	options   serverOptions
}

func withToken(token string) envOption { return func(c *envConfig) { c.apiToken = token } }
func withHasher(h *hasher) envOption   { return func(c *envConfig) { c.hasher = h } }
func withStore(st *store) envOption    { return func(c *envConfig) { c.store = st } }

// withOptions serves with opts instead of the defaults.
func withOptions(opts serverOptions) envOption { return func(c *envConfig) { c.options = opts } }

// withServer lets a test change the http.Server, such as its timeouts.
func withServer(configure func(*http.Server)) envOption {
	return func(c *envConfig) { c.configure = configure }
}

// newTestEnv serves newServer on a fresh schema. Passwords are hashed at
// bcrypt's minimum cost to keep the tests fast.
func newTestEnv(t testing.TB, opts ...envOption) *testEnv {
	t.Helper()
	cfg := envConfig{options: serverOptions{maxStreams: defaultMaxStreams, streamStall: streamStall}}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.store == nil {
		cfg.store = newTestStore(t)
	}
	if cfg.hasher == nil {
		// Slots enough that a client's share (half) is no limit on the
		// races tests run from one client; TestHashingBusyAnswers503 tests it.
		cfg.hasher = newHasher(bcrypt.MinCost, 128, 10*time.Second)
	}
	logs := &syncBuffer{}
	h := newServer(newTestLogger(logs), cfg.store, cfg.hasher, cfg.apiToken, cfg.options)
	url := newTestHTTPServer(t, h, cfg.configure)
	return &testEnv{t: t, url: url, store: cfg.store, hasher: cfg.hasher, logs: logs}
}

func newTestLogger(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }

// newTestHTTPServer serves h with the production http.Server, timeouts
// included, after the configure functions change what a test needs. It
// returns the server's URL.
func newTestHTTPServer(t testing.TB, h http.Handler, configure ...func(*http.Server)) string {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = newHTTPServer(h, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for _, c := range configure {
		if c != nil {
			c(srv.Config)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL
}

// response is what came back from a request.
type response struct {
	status int
	header http.Header
	body   []byte
	what   string // "METHOD path", for failure messages
}

func (r response) String() string {
	return fmt.Sprintf("%s: %d %s", r.what, r.status, r.body)
}

// do sends a request with body (none if empty) and extra header lines
// "Name: value"; "Name:" with no value leaves that header out. A POST or PUT
// is labelled JSON unless a header line says otherwise.
func (e *testEnv) do(method, path, body string, header ...string) response {
	e.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, e.url+path, rd)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	if body != "" || method == http.MethodPost || method == http.MethodPut {
		req.Header.Set("Content-Type", "application/json")
	}
	for _, h := range header {
		name, value, _ := strings.Cut(h, ":")
		switch value = strings.TrimSpace(value); {
		case value == "":
			req.Header.Del(name)
		case strings.EqualFold(name, "Host"):
			req.Host = value
		default:
			req.Header.Set(name, value)
		}
	}
	// Errorf, not Fatalf: tests call do from goroutines too. A failed
	// request comes back as status 0, which no check accepts.
	client := noRedirects
	if e.client != nil {
		client = e.client
	}
	resp, err := client.Do(req)
	if err != nil {
		e.t.Errorf("%s %s: %v", method, path, err)
		return response{what: method + " " + path}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Errorf("%s %s: read body: %v", method, path, err)
		return response{what: method + " " + path}
	}
	// Every answer, whatever it is, carries these.
	if resp.Header.Get("Cache-Control") != "no-store" || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
		e.t.Errorf("%s %s: Cache-Control %q, X-Content-Type-Options %q; want no-store, nosniff",
			method, path, resp.Header.Get("Cache-Control"), resp.Header.Get("X-Content-Type-Options"))
	}
	r := response{status: resp.StatusCode, header: resp.Header, body: b, what: method + " " + path}
	e.checkAnswer(req, r)
	return r
}

// from returns e as seen from a client at ip, a loopback address such as
// 127.0.0.2: Linux routes the whole of 127/8 to the host.
func (e *testEnv) from(ip string) *testEnv {
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	transport := &http.Transport{DialContext: dialer.DialContext}
	e.t.Cleanup(transport.CloseIdleConnections)
	c := *e
	c.client = &http.Client{Transport: transport, CheckRedirect: noRedirects.CheckRedirect, Timeout: noRedirects.Timeout}
	return &c
}

// noRedirects shows a redirect as the answer it is, instead of following it.
// Its timeout is far beyond any bound the service sets itself, so that a
// hang fails the test instead of stalling it.
var noRedirects = &http.Client{
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	Timeout:       30 * time.Second,
}

// syncBuffer is a bytes.Buffer that a logger and a test may share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// waitUntil polls cond until it holds, and fails the test if it does not
// within 30 seconds: far beyond what any condition takes on a loaded machine.
func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 30s for %s", what)
		}
	}
}

// waitNoConnections waits until no database connection with
// applicationName is left.
func waitNoConnections(t testing.TB, applicationName string) {
	t.Helper()
	waitUntil(t, "the database connections of "+applicationName+" to close", func() bool {
		var n int
		err := adminDB.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, applicationName).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		return n == 0
	})
}

// everyUsersRoute is one request to each /users route.
func everyUsersRoute(id int64) []struct{ method, path, body string } {
	create := `{"first_name":"Down","last_name":"Time","email":"down@example.com","password":"passw0rd-1"}`
	return []struct{ method, path, body string }{
		{"POST", "/users/", create},
		{"POST", "/users", create},
		{"GET", "/users/", ""},
		{"GET", "/users", ""},
		{"GET", fmt.Sprintf("/users/%d", id), ""},
		{"PUT", fmt.Sprintf("/users/%d", id), `{"first_name":"Changed"}`},
		{"DELETE", fmt.Sprintf("/users/%d", id), ""},
	}
}

// Tests of main.go: the process, its settings, its listener and its shutdown.

// runningService is run, started by startRun as main starts it.
type runningService struct {
	*testEnv // requests to it, by its loopback address
	addr     string
	logs     *syncBuffer
	cancel   context.CancelFunc
	exited   chan struct{} // closed when run has returned err
	err      error
}

// startRun calls run with env for the environment and waits until it
// listens. The service stops when the test ends, if the test has not
// stopped it.
func startRun(t *testing.T, env map[string]string) *runningService {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &runningService{logs: &syncBuffer{}, cancel: cancel, exited: make(chan struct{})}
	go func() {
		defer close(s.exited)
		s.err = run(ctx, nil, func(k string) string { return env[k] }, s.logs)
	}()
	t.Cleanup(func() { s.stop(t) })
	listening := regexp.MustCompile(`(?:msg=listening addr=|"msg":"listening","addr":")[^ "]+:(\d+)[ "]`)
	var m []string
	waitUntil(t, "run to listen", func() bool {
		select {
		case <-s.exited:
			t.Fatalf("run returned before listening: %v\n%s", s.err, s.logs)
		default:
		}
		m = listening.FindStringSubmatch(s.logs.String())
		return m != nil
	})
	s.addr = "127.0.0.1:" + m[1]
	s.testEnv = &testEnv{t: t, url: "http://" + s.addr}
	return s
}

// stop cancels run and waits for it to return, which must be nil.
func (s *runningService) stop(t *testing.T) {
	t.Helper()
	s.cancel()
	select {
	case <-s.exited:
		if s.err != nil {
			t.Errorf("run after cancel = %v, want nil", s.err)
		}
	case <-time.After(30 * time.Second):
		t.Errorf("run did not return within 30s of cancel")
	}
}

// refusesConnections reports whether nothing accepts connections at addr.
func refusesConnections(addr string) bool {
	c, err := net.Dial("tcp", addr)
	if err == nil {
		c.Close()
	}
	return err != nil
}

func TestRun(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	// application_name marks the service's connections, to see them closed.
	// The test server trusts every local role, so any password will do.
	databaseURL = withParam(withParam(databaseURL, "application_name", schema), "password", "hunter2")
	s := startRun(t, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "BCRYPT_COST": "10"})
	if r := s.do("GET", "/healthz", ""); r.status != http.StatusOK {
		t.Fatalf("%s, want 200", r)
	}
	r := s.do("POST", "/users", `{"first_name":"Ann","last_name":"Lee","email":"ann@example.com","password":"passw0rd-1"}`)
	var u struct{ ID int64 }
	if err := json.Unmarshal(r.body, &u); r.status != http.StatusCreated || err != nil {
		t.Fatalf("%s, want 201 with a user", r)
	}

	s.stop(t)
	if !refusesConnections(s.addr) {
		t.Errorf("%s still accepts connections after run returned", s.addr)
	}
	waitNoConnections(t, schema)
	logs := s.logs.String()
	if !strings.Contains(logs, "msg=stopped") {
		t.Errorf("log has no stop line:\n%s", logs)
	}
	// The start log names the database, and no line holds its password.
	pqcfg, err := pq.NewConfig(databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("database.host=%s database.port=%d database.name=%s ", pqcfg.Host, pqcfg.Port, pqcfg.Database)
	if !strings.Contains(logs, want) || strings.Contains(logs, "hunter2") {
		t.Errorf("log does not have %q, or holds the password:\n%s", want, logs)
	}
	// The user was stored, hashed at the cost BCRYPT_COST set.
	var hash string
	if err := adminDB.QueryRow(`SELECT password FROM `+schema+`.users WHERE id = $1`, u.ID).Scan(&hash); err != nil ||
		!strings.HasPrefix(hash, "$2a$10$") {
		t.Errorf("stored hash of user %d: %.7q, %v; want cost 10 from BCRYPT_COST", u.ID, hash, err)
	}
}

func TestRunLogsJSON(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	s := startRun(t, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "LOG_FORMAT": "json"})
	s.do("GET", "/healthz", "", "X-Request-Id: probe-1")
	s.stop(t)
	logs := s.logs.String()
	for _, line := range strings.Split(strings.TrimSpace(logs), "\n") {
		if !json.Valid([]byte(line)) {
			t.Errorf("LOG_FORMAT=json: log line %q is not JSON", line)
		}
	}
	if !strings.Contains(logs, `"msg":"request","request_id":"probe-1","client":"127.0.0.1"`) {
		t.Errorf("LOG_FORMAT=json: no request line with its id and client:\n%s", logs)
	}
}

// closedAddr returns a loopback address where nothing listens.
func closedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func TestServerTimeouts(t *testing.T) {
	t.Parallel()
	// Tests shorten these to run quickly; this one holds the values the
	// service runs with, which the README documents.
	srv := newHTTPServer(http.NotFoundHandler(), newTestLogger(io.Discard))
	got := [...]any{srv.ReadHeaderTimeout, srv.ReadTimeout, srv.WriteTimeout, srv.IdleTimeout, srv.MaxHeaderBytes, srv.DisableGeneralOptionsHandler}
	want := [...]any{5 * time.Second, 16 * time.Second, 30 * time.Second, 60 * time.Second, 64 << 10, true}
	if got != want {
		t.Errorf("newHTTPServer: ReadHeaderTimeout, ReadTimeout, WriteTimeout, IdleTimeout, MaxHeaderBytes, DisableGeneralOptionsHandler = %v, want %v", got, want)
	}
}

// TestRunGuardsByAddressAndToken checks what run does when there is no
// token: on a loopback address it refuses requests for other hosts (DNS
// rebinding); on any other it warns in the log.
func TestRunGuardsByAddressAndToken(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	for _, tt := range []struct {
		addr, token         string
		hostChecked, warned bool
	}{
		{"127.0.0.1:0", "", true, false},
		{"127.0.0.1:0", "tok", false, false},
		{"0.0.0.0:0", "", false, true},
		{"0.0.0.0:0", "tok", false, false},
	} {
		s := startRun(t, map[string]string{"DATABASE_URL": databaseURL, "ADDR": tt.addr, "API_TOKEN": tt.token})
		port := s.addr[strings.LastIndex(s.addr, ":")+1:]
		r := s.do("GET", "/healthz", "", "Host: evil.example:"+port)
		if checked := r.status == http.StatusMisdirectedRequest; checked != tt.hostChecked {
			t.Errorf("ADDR=%s API_TOKEN=%q: %s; want 421: %v", tt.addr, tt.token, r, tt.hostChecked)
		}
		if r := s.do("GET", "/healthz", "", "Host: localhost:"+port); r.status != http.StatusOK {
			t.Errorf("ADDR=%s API_TOKEN=%q: %s with Host localhost, want 200", tt.addr, tt.token, r)
		}
		s.stop(t)
		if warned := strings.Contains(s.logs.String(), "API_TOKEN is not set"); warned != tt.warned {
			t.Errorf("ADDR=%s API_TOKEN=%q: warning logged = %v, want %v\n%s", tt.addr, tt.token, warned, tt.warned, s.logs)
		}
	}
}

// dialMany opens n connections to addr, closed when the test ends. If
// request is not empty, each sends it and reads the answer, which must have
// status.
func dialMany(t *testing.T, addr string, n int, request string, status int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		if request != "" {
			if got := answerOn(c, request); !strings.HasPrefix(got, strconv.Itoa(status)+" ") {
				t.Fatalf("connection %d to %s: %s, want %d", i, addr, got, status)
			}
		}
	}
	return conns
}

// answerOn sends request on c and describes the answer: its status,
// Retry-After, whether the server closes the connection after it, and its
// body.
func answerOn(c net.Conn, request string) string {
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	io.WriteString(c, request)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d Retry-After=%q close=%v %q", resp.StatusCode, resp.Header.Get("Retry-After"), resp.Close, body)
}

// createExpectingBody is a create whose body has not come yet. The server
// asks for it with 100 Continue once the handler has the request, busy.
func createExpectingBody(body string) string {
	return "POST /users/ HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\nExpect: 100-continue\r\n\r\n"
}

func TestClientLimit(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	const maxClients = 4
	s := startRun(t, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "MAX_CLIENTS": strconv.Itoa(maxClients)})

	t.Run("idle connections make room", func(t *testing.T) {
		// Twice the limit: connections that never spoke, then connections
		// kept alive after a request.
		idle := dialMany(t, s.addr, maxClients, "", 0)
		idle = append(idle, dialMany(t, s.addr, maxClients, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", http.StatusOK)...)
		if r := s.do("GET", "/healthz", ""); r.status != http.StatusOK {
			t.Fatalf("%s beside %d idle connections, want 200", r, len(idle))
		}
		// The server holds no more than the limit: the client's connection
		// and at most maxClients-1 of the others.
		waitUntil(t, "the server to close idle connections", func() bool {
			open := 0
			for _, c := range idle {
				// A read finds the end of a closed connection, and times
				// out on an open one.
				c.SetReadDeadline(time.Now().Add(time.Millisecond))
				if _, err := c.Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) {
					open++
				}
			}
			return open <= maxClients-1
		})
	})

	t.Run("busy connections refuse new ones", func(t *testing.T) {
		busy := dialMany(t, s.addr, maxClients, createExpectingBody("{}"), http.StatusContinue)
		c := dialMany(t, s.addr, 1, "", 0)[0]
		refused := `503 Retry-After="1" close=true "{\"detail\":\"Service unavailable\"}\n"`
		if got := answerOn(c, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"); got != refused {
			t.Errorf("a connection past %d busy ones: %s, want %s", maxClients, got, refused)
		}
		if !strings.Contains(s.logs.String(), "every client connection is busy") {
			t.Errorf("the refusal was not logged:\n%s", s.logs)
		}
		// A burst of them, silent: each gets its answer, not just a closed
		// connection.
		const burst = 100
		answers := make(chan string, burst)
		for range burst {
			go func() {
				c, err := net.Dial("tcp", s.addr)
				if err != nil {
					answers <- err.Error()
					return
				}
				defer c.Close()
				answers <- answerOn(c, "")
			}()
		}
		for i := range burst {
			if got := <-answers; got != refused {
				t.Errorf("connection %d of a burst past %d busy ones: %s, want %s", i, maxClients, got, refused)
			}
		}
		// The busy connections were kept, and finish as they would have.
		for i, c := range busy {
			if got := answerOn(c, "{}"); !strings.HasPrefix(got, "400 ") {
				t.Errorf("busy connection %d: %s after its body, want 400", i, got)
			}
		}
	})
}

func TestGracefulShutdown(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	s := startRun(t, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "BCRYPT_COST": "10"})
	body := func(i int) string {
		return fmt.Sprintf(`{"first_name":"Ann","last_name":"Lee","email":"u%d@example.com","password":"passw0rd-1"}`, i)
	}
	// Creates in flight: the server has each request, and waits for its body.
	const inFlight = 3
	conns := dialMany(t, s.addr, inFlight, createExpectingBody(body(0)), http.StatusContinue)

	s.cancel()
	waitUntil(t, "new connections to be refused", func() bool { return refusesConnections(s.addr) })
	select {
	case <-s.exited:
		t.Fatalf("run returned %v with %d requests in flight", s.err, inFlight)
	default:
	}
	for i, c := range conns {
		if got := answerOn(c, body(i)); !strings.HasPrefix(got, "201 ") {
			t.Errorf("create %d, its body sent during the shutdown: %s, want 201", i, got)
		}
	}
	s.stop(t)
	var n int
	if err := adminDB.QueryRow(`SELECT count(*) FROM ` + schema + `.users`).Scan(&n); err != nil || n != inFlight {
		t.Errorf("%d users stored (%v), want the %d created during the shutdown", n, err, inFlight)
	}
}

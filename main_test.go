package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"database/sql"
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

	"golang.org/x/crypto/bcrypt"
)

// The tests run against PostgreSQL at TEST_DATABASE_URL, or the service's
// default, each in a schema of its own that openStore fills as in production.

func testDatabaseURL() string { return cmp.Or(os.Getenv("TEST_DATABASE_URL"), defaultDatabaseURL) }

// adminDB creates and drops the tests' schemas. TestMain opens it.
var adminDB *sql.DB

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	dsn, err := parseDatabaseURL(testDatabaseURL())
	adminDB, _ = sql.Open("postgres", dsn)
	if err = cmp.Or(err, adminDB.PingContext(ctx)); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: no PostgreSQL at %s (%v): set TEST_DATABASE_URL to a database where you may create schemas\n", databaseAttr(dsn).Value, err)
		os.Exit(1)
	}
	code := m.Run()
	if code == 0 && fullRun() && !checkAnswersDocumented(os.Stderr) {
		code = 1
	}
	os.Exit(code)
}

// newSchema creates a schema, dropped when the test ends, and a URL that uses it.
func newSchema(t testing.TB) (databaseURL, schema string) {
	t.Helper()
	schema = "test_" + strings.ToLower(rand.Text())
	if _, err := adminDB.Exec(`CREATE SCHEMA ` + schema); err != nil {
		t.Fatalf("create schema: %v", err)
	}
	t.Cleanup(func() { adminDB.Exec(`DROP SCHEMA ` + schema + ` CASCADE`) })
	// A session time zone other than UTC: the service must answer in UTC.
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

// testPool keeps each test's pool small, as tests share one server.
var testPool = poolConfig{maxOpen: 8, maxIdle: 8, maxIdleTime: time.Minute}

// newTestStore opens a store on a fresh schema.
func newTestStore(t testing.TB) *store {
	t.Helper()
	databaseURL, _ := newSchema(t)
	return newStoreAt(t, databaseURL)
}

// newStoreAt opens a store at databaseURL with testPool and the service's bound.
func newStoreAt(t testing.TB, databaseURL string) *store {
	return newStoreWith(t, databaseURL, testPool, queryTimeout)
}

// newStoreWith opens a store as the service does, closed when the test ends.
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
	t         testing.TB
	url       string
	store     *store
	hasher    *hasher
	logs      *syncBuffer
	client    *http.Client       // nil for noRedirects, from 127.0.0.1
	apiToken  string             // this and the next two, as envOptions set them
	configure func(*http.Server) // such as its timeouts
	options   serverOptions
}

type envOption func(*testEnv)

func withToken(token string) envOption         { return func(e *testEnv) { e.apiToken = token } }
func withHasher(h *hasher) envOption           { return func(e *testEnv) { e.hasher = h } }
func withStore(st *store) envOption            { return func(e *testEnv) { e.store = st } }
func withOptions(opts serverOptions) envOption { return func(e *testEnv) { e.options = opts } }
func withServer(configure func(*http.Server)) envOption {
	return func(e *testEnv) { e.configure = configure }
}

// newTestEnv serves newServer on a fresh schema, hashing at bcrypt's minimum cost.
func newTestEnv(t testing.TB, opts ...envOption) *testEnv {
	t.Helper()
	e := &testEnv{t: t, logs: &syncBuffer{}, options: serverOptions{maxStreams: defaultMaxStreams, streamStall: streamStall}}
	for _, o := range opts {
		o(e)
	}
	if e.store == nil {
		e.store = newTestStore(t)
	}
	if e.hasher == nil {
		// A client's share (half) of these slots is no limit on the tests.
		e.hasher = newHasher(bcrypt.MinCost, 128, 10*time.Second)
	}
	e.url = newTestHTTPServer(t, newServer(newTestLogger(e.logs), e.store, e.hasher, e.apiToken, e.options), e.configure)
	return e
}

func newTestLogger(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }

// newTestHTTPServer serves h with newHTTPServer, changed by configure, and returns its URL.
func newTestHTTPServer(t testing.TB, h http.Handler, configure ...func(*http.Server)) string {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = newHTTPServer(h, newTestLogger(io.Discard))
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

func (r response) String() string { return fmt.Sprintf("%s: %d %s", r.what, r.status, r.body) }

// do sends a request with body and header lines "Name: value" ("Name:" leaves
// it out); a POST or PUT is labelled JSON. A failed request has status 0.
func (e *testEnv) do(method, path, body string, header ...string) response {
	e.t.Helper()
	r := response{what: method + " " + path}
	req, err := http.NewRequest(method, e.url+path, strings.NewReader(body))
	if err != nil {
		e.t.Fatalf("%s: %v", r.what, err)
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
	resp, err := cmp.Or(e.client, noRedirects).Do(req)
	if err == nil {
		defer resp.Body.Close()
		r.body, err = io.ReadAll(resp.Body)
	}
	if err != nil {
		e.t.Errorf("%s: %v", r.what, err) // not Fatalf: tests call do from goroutines too
		return r
	}
	r.status, r.header = resp.StatusCode, resp.Header
	if r.header.Get("Cache-Control") != "no-store" || r.header.Get("X-Content-Type-Options") != "nosniff" {
		e.t.Errorf("%s: Cache-Control %q, X-Content-Type-Options %q; want no-store, nosniff", r.what, r.header.Get("Cache-Control"), r.header.Get("X-Content-Type-Options"))
	}
	e.checkAnswer(req, r)
	return r
}

// from returns e as seen from ip, such as 127.0.0.2 (Linux routes 127/8 to the host).
func (e *testEnv) from(ip string) *testEnv {
	transport := &http.Transport{DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}).DialContext}
	e.t.Cleanup(transport.CloseIdleConnections)
	c := *e
	c.client = &http.Client{Transport: transport, CheckRedirect: noRedirects.CheckRedirect, Timeout: noRedirects.Timeout}
	return &c
}

// noRedirects shows a redirect as it is; its timeout makes a hang fail the test.
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

// waitUntil polls cond until it holds, for at most 30 s: far beyond what any condition takes on a loaded machine.
func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 30s for %s", what)
		}
	}
}

// waitNoConnections waits until no database connection has applicationName.
func waitNoConnections(t testing.TB, applicationName string) {
	t.Helper()
	waitUntil(t, "the database connections of "+applicationName+" to close", func() bool {
		n := -1
		adminDB.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, applicationName).Scan(&n)
		return n == 0
	})
}

// everyUsersRoute is one request to each /users route.
func everyUsersRoute(id int64) []struct{ method, path, body string } {
	create, user := `{"first_name":"Down","last_name":"Time","email":"down@example.com","password":"passw0rd-1"}`, fmt.Sprintf("/users/%d", id)
	return []struct{ method, path, body string }{
		{"POST", "/users/", create}, {"POST", "/users", create}, {"GET", "/users/", ""}, {"GET", "/users", ""},
		{"GET", user, ""}, {"PUT", user, `{"first_name":"Changed"}`}, {"DELETE", user, ""},
	}
}

// closedAddr returns a loopback address where nothing listens.
func closedAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	return ln.Addr().String()
}

// runningService is run, started by startRun as main starts it.
type runningService struct {
	*testEnv // requests to it by its loopback address; logs is run's log
	addr     string
	cancel   context.CancelFunc
	exited   chan struct{} // closed when run has returned err
	err      error
}

// startRun calls run with env and waits until it listens; it stops with the test.
func startRun(t *testing.T, env map[string]string) *runningService {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &runningService{testEnv: &testEnv{t: t, logs: &syncBuffer{}}, cancel: cancel, exited: make(chan struct{})}
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
	s.url = "http://" + s.addr
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
	case <-time.After(time.Minute):
		t.Errorf("run did not return within a minute of cancel")
	}
}

// TestRun stops the service with creates in flight: they finish, and run returns nil.
func TestRun(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	// application_name marks its connections; the server takes any password.
	databaseURL = withParam(withParam(databaseURL, "application_name", schema), "password", "hunter2")
	s := startRun(t, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "BCRYPT_COST": "10"})
	body := func(i int) string {
		return fmt.Sprintf(`{"first_name":"A","last_name":"L","email":"u%d@example.com","password":"passw0rd-1"}`, i)
	}
	conns := dialMany(t, s.addr, 3, createExpectingBody(body(0)), http.StatusContinue)
	s.cancel()
	waitUntil(t, "run to shut down", func() bool { return strings.Contains(s.logs.String(), `msg="shutting down"`) })
	for i, c := range conns { // one by one: a client hashes one password at a time
		if got := answerOn(c, body(i)); !strings.HasPrefix(got, "201 ") {
			t.Errorf("create %d, its body sent during the shutdown: %s, want 201", i, got)
		}
	}
	s.stop(t)
	waitNoConnections(t, schema)
	var n int // stored, hashed at the cost BCRYPT_COST set
	if err := adminDB.QueryRow(`SELECT count(*) FROM ` + schema + `.users WHERE password LIKE '$2a$10$%'`).Scan(&n); err != nil || n != len(conns) {
		t.Errorf("%d users stored at cost 10 (%v), want the %d created during the shutdown", n, err, len(conns))
	}
	want := regexp.MustCompile(`(?s)database\.host=\S+ database\.port=\d+ database\.name=\S+ .*msg=stopped`) // and no password
	if logs := s.logs.String(); !want.MatchString(logs) || strings.Contains(logs, "hunter2") {
		t.Errorf("log does not match %s, or holds the password:\n%s", want, logs)
	}
}

func TestServerTimeouts(t *testing.T) {
	t.Parallel()
	srv := newHTTPServer(http.NotFoundHandler(), newTestLogger(io.Discard)) // the values the README documents
	got := [...]any{srv.ReadHeaderTimeout, srv.ReadTimeout, srv.WriteTimeout, srv.IdleTimeout, srv.MaxHeaderBytes, srv.DisableGeneralOptionsHandler}
	want := [...]any{5 * time.Second, 16 * time.Second, 30 * time.Second, 60 * time.Second, 64 << 10, true}
	if got != want {
		t.Errorf("newHTTPServer: ReadHeaderTimeout, ReadTimeout, WriteTimeout, IdleTimeout, MaxHeaderBytes, DisableGeneralOptionsHandler = %v, want %v", got, want)
	}
}

// TestRunGuardsByAddressAndToken: without a token, run refuses other Hosts on loopback (DNS rebinding), warns elsewhere.
func TestRunGuardsByAddressAndToken(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	for _, tt := range []struct {
		addr, token, logFormat string
		hostChecked, warned    bool
	}{
		{"127.0.0.1:0", "", "text", true, false},
		{"127.0.0.1:0", "tok", "json", false, false},
		{"0.0.0.0:0", "", "json", false, true},
		{"0.0.0.0:0", "tok", "text", false, false},
	} {
		s := startRun(t, map[string]string{"DATABASE_URL": databaseURL, "ADDR": tt.addr, "API_TOKEN": tt.token, "LOG_FORMAT": tt.logFormat})
		if r := s.do("GET", "/healthz", "", "Host: evil.example"); (r.status == http.StatusMisdirectedRequest) != tt.hostChecked {
			t.Errorf("ADDR=%s API_TOKEN=%q: %s with Host evil.example; want 421: %v", tt.addr, tt.token, r, tt.hostChecked)
		}
		s.stop(t)
		if warned := strings.Contains(s.logs.String(), "API_TOKEN is not set"); warned != tt.warned {
			t.Errorf("ADDR=%s API_TOKEN=%q: warning logged = %v, want %v\n%s", tt.addr, tt.token, warned, tt.warned, s.logs)
		}
		if lines := strings.ReplaceAll(strings.TrimSpace(s.logs.String()), "\n", ","); json.Valid([]byte("["+lines+"]")) != (tt.logFormat == "json") {
			t.Errorf("LOG_FORMAT=%s: the log is JSON lines: %v\n%s", tt.logFormat, tt.logFormat == "json", s.logs)
		}
	}
}

// dialMany opens n connections to addr, sending request (if any) on each and checking its status.
func dialMany(t *testing.T, addr string, n int, request string, status int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	for i := range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns[i] = c
		if request != "" {
			if got := answerOn(c, request); !strings.HasPrefix(got, strconv.Itoa(status)+" ") {
				t.Fatalf("connection %d to %s: %s, want %d", i, addr, got, status)
			}
		}
	}
	return conns
}

// answerOn sends request on c and describes the answer: status, Retry-After, close, body.
func answerOn(c net.Conn, request string) string {
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	io.WriteString(c, request)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return err.Error()
	}
	body, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d Retry-After=%q close=%v %q", resp.StatusCode, resp.Header.Get("Retry-After"), resp.Close, body)
}

// createExpectingBody is a create the handler has, busy, after a 100 Continue, without its body.
func createExpectingBody(body string) string {
	return "POST /users/ HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\nExpect: 100-continue\r\n\r\n"
}

func TestClientLimit(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	const maxClients = 4
	s := startRun(t, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "MAX_CLIENTS": strconv.Itoa(maxClients)})
	healthz := "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
	// Idle connections make room: twice the limit, silent or kept alive.
	idle := append(dialMany(t, s.addr, maxClients, "", 0), dialMany(t, s.addr, maxClients, healthz, http.StatusOK)...)
	if r := s.do("GET", "/healthz", ""); r.status != http.StatusOK {
		t.Fatalf("%s beside %d idle connections, want 200", r, len(idle))
	}
	// The server holds the client's connection and at most maxClients-1 others.
	waitUntil(t, "the server to close idle connections", func() bool {
		open := 0
		for _, c := range idle {
			// A read finds the end of a closed connection, and times out on an open one.
			c.SetReadDeadline(time.Now().Add(time.Millisecond))
			if _, err := c.Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) {
				open++
			}
		}
		return open <= maxClients-1
	})
	// Busy connections refuse new ones with an answer, not a reset: one that sent a request, then a burst.
	busy := dialMany(t, s.addr, maxClients, createExpectingBody("{}"), http.StatusContinue)
	refused := `503 Retry-After="1" close=true "{\"detail\":\"Service unavailable\"}\n"`
	if got := answerOn(dialMany(t, s.addr, 1, "", 0)[0], healthz); got != refused {
		t.Errorf("a connection past %d busy ones: %s, want %s", maxClients, got, refused)
	}
	for i, c := range dialMany(t, s.addr, 100, "", 0) {
		if got := answerOn(c, ""); got != refused {
			t.Errorf("connection %d of a burst past %d busy ones: %s, want %s", i, maxClients, got, refused)
		}
	}
	waitUntil(t, "the refusal to be logged", func() bool { return strings.Contains(s.logs.String(), "every client connection is busy") })
	// The busy connections were kept, and finish as they would have.
	for i, c := range busy {
		if got := answerOn(c, "{}"); !strings.HasPrefix(got, "400 ") {
			t.Errorf("busy connection %d: %s after its body, want 400", i, got)
		}
	}
}

package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"regexp"
	"runtime"
	"runtime/debug"
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
	databaseURL := testDatabaseURL()
	db, err := sql.Open("postgres", databaseURL)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = db.PingContext(ctx)
		cancel()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: these tests need PostgreSQL and none answers at %s (%v): set TEST_DATABASE_URL to a database where you may create schemas\n",
			databaseAddr(databaseURL), redactURLError(err))
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
	return withParam(testDatabaseURL(), "search_path", schema), schema
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
	st, err := openStore(context.Background(), databaseURL, testPool, 5*time.Second)
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
	cfg := envConfig{options: serverOptions{maxStreams: defaultMaxStreams}}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.store == nil {
		cfg.store = newTestStore(t)
	}
	if cfg.hasher == nil {
		cfg.hasher = newHasher(bcrypt.MinCost, runtime.GOMAXPROCS(0), 10*time.Second)
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
	resp, err := noRedirects.Do(req)
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

// Tests of main.go: the process, its settings, its listener and its shutdown.

// startRun calls run as main does, with env for the environment, and waits
// until it listens. It returns the address, the log and run's result.
func startRun(t *testing.T, ctx context.Context, env map[string]string) (addr string, logs *syncBuffer, done <-chan error) {
	t.Helper()
	logs = &syncBuffer{}
	result := make(chan error, 1)
	go func() { result <- run(ctx, nil, func(k string) string { return env[k] }, logs, io.Discard) }()
	listening := regexp.MustCompile(`msg=listening addr=(\S+)`)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if m := listening.FindStringSubmatch(logs.String()); m != nil {
			return m[1], logs, result
		}
		select {
		case err := <-result:
			t.Fatalf("run returned before listening: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("run did not listen within 10s; log:\n%s", logs)
	return "", nil, nil
}

func TestRunServesAndStopsCleanly(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	// application_name marks the service's connections, to see them closed.
	databaseURL = withParam(databaseURL, "application_name", schema)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, logs, done := startRun(t, ctx, map[string]string{
		"DATABASE_URL": databaseURL,
		"ADDR":         "127.0.0.1:0",
		"BCRYPT_COST":  "10",
	})
	e := &testEnv{t: t, url: "http://" + addr}
	if r := e.do("GET", "/healthz", ""); r.status != http.StatusOK {
		t.Fatalf("%s, want 200", r)
	}
	u := mustUser(t, e.do("POST", "/users", userBody("Ann", "Lee", "ann@example.com", "password1")), http.StatusCreated)
	mustUser(t, e.do("GET", "/users/1", ""), http.StatusOK)

	cancel()
	waitStopped(t, done)
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Errorf("%s still accepts connections after run returned", addr)
	}
	waitNoConnections(t, schema)
	if !strings.Contains(logs.String(), "msg=stopped") {
		t.Errorf("log has no stop line:\n%s", logs)
	}
	// What was created is stored with the configured cost.
	st := newStoreAt(t, databaseURL)
	if _, err := st.User(context.Background(), u.ID); err != nil {
		t.Errorf("user %d after restart: %v", u.ID, err)
	}
	var hash string
	st.db.QueryRow(`SELECT password FROM users WHERE id = $1`, u.ID).Scan(&hash)
	if !strings.HasPrefix(hash, "$2a$10$") {
		t.Errorf("stored hash %q, want cost 10 from BCRYPT_COST", hash)
	}
}

// waitStopped waits for run, cancelled, to return nil.
func waitStopped(t *testing.T, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run after cancel = %v, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("run did not return within 30s of cancel")
	}
}

// waitNoConnections waits until no connection with application_name is left.
func waitNoConnections(t *testing.T, applicationName string) {
	t.Helper()
	var n int
	for i := 0; i < 100; i++ {
		if err := adminDB.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, applicationName).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("%d database connections still open: the pool was not closed", n)
}

func newStoreAt(t *testing.T, databaseURL string) *store {
	t.Helper()
	st, err := openStore(context.Background(), databaseURL, testPool, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// closedAddr returns a loopback address where nothing listens.
func closedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestRunRefusesBadConfiguration(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	down := closedAddr(t)
	tests := []struct {
		name  string
		env   map[string]string
		args  []string
		wants []string // in the error
	}{
		{"cost not a number", map[string]string{"BCRYPT_COST": "twelve"}, nil, []string{"BCRYPT_COST", `"twelve"`}},
		{"cost too low", map[string]string{"BCRYPT_COST": "9"}, nil, []string{"BCRYPT_COST", "10 to 15"}},
		{"cost too high", map[string]string{"BCRYPT_COST": "16"}, nil, []string{"BCRYPT_COST", "10 to 15"}},
		{"cost flag out of range", nil, []string{"-bcrypt-cost", "4"}, []string{"-bcrypt-cost", "10 to 15"}},
		{"pool size", map[string]string{"DB_MAX_CONNS": "0"}, nil, []string{"DB_MAX_CONNS"}},
		{"pool beyond the file limit", map[string]string{"DB_MAX_CONNS": "100000000"}, nil, []string{"DB_MAX_CONNS", "no room"}},
		{"token with spaces", map[string]string{"API_TOKEN": "tok "}, nil, []string{"API_TOKEN", "white space"}},
		{"GOMAXPROCS not a number", map[string]string{"GOMAXPROCS": "abc"}, nil, []string{"GOMAXPROCS", `"abc"`}},
		{"stray argument", nil, []string{"serve"}, []string{"unexpected arguments"}},
		{"unknown flag", nil, []string{"-nope"}, []string{"-nope"}},
		{"port not a number", map[string]string{"PORT": "http"}, nil, []string{"PORT", `"http"`}},
		{"port out of range", map[string]string{"PORT": "65536"}, nil, []string{"PORT"}},
		{"database down", map[string]string{"DATABASE_URL": "postgres://ann:hunter2@" + down + "/db?sslmode=disable"}, nil,
			[]string{"DATABASE_URL", down}},
		{"database URL unparsable", map[string]string{"DATABASE_URL": "postgres://ann:hunter2@host:port/db"}, nil,
			[]string{"DATABASE_URL"}},
		{"address taken", map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:-1"}, nil, []string{"ADDR"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			var stderr syncBuffer
			err := run(context.Background(), tt.args, func(k string) string { return tt.env[k] }, io.Discard, &stderr)
			if stderr.String() != "" {
				t.Errorf("run wrote to stderr besides its error: %q", stderr.String())
			}
			if err == nil {
				t.Fatal("run succeeded, want an error")
			}
			msg := err.Error()
			for _, want := range tt.wants {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q does not mention %q", msg, want)
				}
			}
			if strings.Contains(msg, "\n") || strings.Contains(msg, "hunter2") {
				t.Errorf("error %q is not one line free of the password", msg)
			}
			if d := time.Since(start); d > 6*time.Second {
				t.Errorf("run took %v to fail, want a few seconds at most", d)
			}
		})
	}
}

func TestLoadConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want config
	}{
		{"defaults", nil, nil, config{addr: "127.0.0.1:8000", databaseURL: defaultDatabaseURL, bcryptCost: 12}},
		{"platform PORT", map[string]string{"PORT": "9000"}, nil, config{addr: ":9000", databaseURL: defaultDatabaseURL, bcryptCost: 12}},
		{"ADDR wins over PORT", map[string]string{"PORT": "9000", "ADDR": "0.0.0.0:80"}, nil, config{addr: "0.0.0.0:80", databaseURL: defaultDatabaseURL, bcryptCost: 12}},
		{"environment", map[string]string{"DATABASE_URL": "postgres://db/x", "BCRYPT_COST": "10", "API_TOKEN": "t"}, nil,
			config{addr: "127.0.0.1:8000", databaseURL: "postgres://db/x", bcryptCost: 10, apiToken: "t"}},
		{"flags win over environment", map[string]string{"ADDR": ":1", "DATABASE_URL": "postgres://a/", "BCRYPT_COST": "10"},
			[]string{"-addr", ":2", "-database-url", "postgres://b/", "-bcrypt-cost", "15"},
			config{addr: ":2", databaseURL: "postgres://b/", bcryptCost: 15}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := loadConfig(tt.args, func(k string) string { return tt.env[k] }, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			got.pool = poolConfig{}
			got.maxClients, got.maxStreams, got.maxClientsSet, got.maxClientsFrom = 0, 0, "", "" // TestClientAndStreamLimits
			got.addrFrom, got.databaseURLFrom = "", ""                                           // TestSettingErrorsNameTheirSource
			if got != tt.want {
				t.Errorf("loadConfig = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestServerTimeouts(t *testing.T) {
	t.Parallel()
	// The slow-client tests shorten these to run quickly; this one holds the
	// values the service runs with, which the README documents.
	srv := newHTTPServer(http.NotFoundHandler(), newTestLogger(io.Discard))
	for _, tt := range []struct {
		name      string
		got, want time.Duration
	}{
		{"ReadHeaderTimeout", srv.ReadHeaderTimeout, 5 * time.Second},
		{"ReadTimeout", srv.ReadTimeout, 16 * time.Second},
		{"WriteTimeout", srv.WriteTimeout, 30 * time.Second},
		{"IdleTimeout", srv.IdleTimeout, 60 * time.Second},
	} {
		if tt.got != tt.want {
			t.Errorf("%s = %v, want %v", tt.name, tt.got, tt.want)
		}
	}
	if srv.MaxHeaderBytes != 64<<10 {
		t.Errorf("MaxHeaderBytes = %d, want 64 KiB", srv.MaxHeaderBytes)
	}
}

func TestClientAndStreamLimits(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		value     string
		fileLimit uint64
		pool      int
		want      int // 0: an error
	}{
		{"", 1024, 16, 1024 - 16 - 64},
		{"", 1 << 20, 16, 4096},
		{"", 100, 16, 20},
		{"", 80, 16, 0},
		{"500", 1024, 16, 500},
		{"944", 1024, 16, 944},
		{"945", 1024, 16, 0},
		{"0", 1024, 16, 0},
		{"-1", 1024, 16, 0},
		{"many", 1024, 16, 0},
	} {
		got, err := parseMaxClients(tt.value, tt.fileLimit, tt.pool)
		if got != tt.want || (err == nil) != (tt.want != 0) {
			t.Errorf("parseMaxClients(%q, %d, %d) = %d, %v; want %d", tt.value, tt.fileLimit, tt.pool, got, err, tt.want)
		}
	}

	for _, tt := range []struct {
		name       string
		env        map[string]string
		args       []string
		maxStreams int
		maxClients int // 0: the default
	}{
		{"defaults", nil, nil, 32, 0},
		{"environment", map[string]string{"MAX_STREAMS": "5", "MAX_CLIENTS": "100"}, nil, 5, 100},
		{"flags win", map[string]string{"MAX_STREAMS": "5", "MAX_CLIENTS": "100"}, []string{"-max-streams", "6", "-max-clients", "200"}, 6, 200},
	} {
		cfg, err := loadConfig(tt.args, func(k string) string { return tt.env[k] }, io.Discard)
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		wantClients := tt.maxClients
		if wantClients == 0 {
			wantClients, _ = parseMaxClients("", fileLimit(), cfg.pool.maxOpen)
		}
		if cfg.maxStreams != tt.maxStreams || cfg.maxClients != wantClients {
			t.Errorf("%s: maxStreams %d, maxClients %d; want %d, %d", tt.name, cfg.maxStreams, cfg.maxClients, tt.maxStreams, wantClients)
		}
	}
	for _, env := range []map[string]string{{"MAX_STREAMS": "0"}, {"MAX_STREAMS": "x"}, {"MAX_CLIENTS": "0"}, {"MAX_CLIENTS": "1e9"}} {
		_, err := loadConfig(nil, func(k string) string { return env[k] }, io.Discard)
		for name := range env {
			if err == nil || !strings.Contains(err.Error(), name) {
				t.Errorf("loadConfig with %v = %v, want an error naming %s", env, err, name)
			}
		}
	}
}

// dialMany opens n connections to addr, closed in t.Cleanup. If request is
// not empty, each sends it and reads the answer, which must have status.
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
		if request == "" {
			continue
		}
		io.WriteString(c, request)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		resp.Body.Close()
		if resp.StatusCode != status {
			t.Fatalf("connection %d: status %d, want %d", i, resp.StatusCode, status)
		}
	}
	return conns
}

// openConns returns how many of conns the server has not closed: those
// where a read finds nothing yet rather than the end.
func openConns(conns []net.Conn) int {
	open := 0
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				open++
			}
		}
	}
	return open
}

func TestIdleClientsMakeRoom(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const maxClients, token = 10, "tok-7"
	addr, _, done := startRun(t, ctx, map[string]string{
		"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "API_TOKEN": token, "MAX_CLIENTS": strconv.Itoa(maxClients),
	})
	// Cleanups run last first: the connections close before the stop, which
	// would otherwise wait for those that never spoke.
	t.Cleanup(func() { cancel(); waitStopped(t, done) })

	// Twice the limit: connections that never speak, connections that
	// asked without the token, connections kept alive after a request.
	flood := dialMany(t, addr, maxClients, "", 0)
	flood = append(flood, dialMany(t, addr, maxClients/2, "GET /users/ HTTP/1.1\r\nHost: localhost\r\n\r\n", http.StatusUnauthorized)...)
	flood = append(flood, dialMany(t, addr, maxClients/2, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", http.StatusOK)...)

	client := &http.Client{Transport: &http.Transport{}, Timeout: 30 * time.Second}
	defer client.CloseIdleConnections()
	req, _ := http.NewRequest("GET", "http://"+addr+"/users/?limit=1", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("GET /users/ with the token, beside %d idle connections: %v", len(flood), err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /users/ with the token, beside %d idle connections: %d, want 200", len(flood), resp.StatusCode)
	}
	t.Logf("answered in %v beside %d idle connections", time.Since(start), len(flood))

	// The server holds no more than the limit: the client's own connection
	// and at most maxClients-1 of the flood.
	deadline := time.Now().Add(10 * time.Second)
	for open := openConns(flood); open > maxClients-1; open = openConns(flood) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d idle connections still open, want at most %d", open, len(flood), maxClients-1)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestBusyClientsRefuseNewOnes(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const maxClients = 3
	addr, logs, done := startRun(t, ctx, map[string]string{
		"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "MAX_CLIENTS": strconv.Itoa(maxClients),
	})
	t.Cleanup(func() { cancel(); waitStopped(t, done) })

	// Each busy connection is a create whose body has not come yet; the
	// server asks for it with 100 Continue once the request is in hand.
	busy := dialMany(t, addr, maxClients, "POST /users/ HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"+
		"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n", http.StatusContinue)

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("a connection past %d busy ones: %v", maxClients, err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || !resp.Close ||
		string(body) != `{"detail":"Service unavailable"}`+"\n" {
		t.Errorf("a connection past %d busy ones: %d, Retry-After %q, Connection: close %v, body %q; want 503, Retry-After, close",
			maxClients, resp.StatusCode, resp.Header.Get("Retry-After"), resp.Close, body)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after the 503, reading the connection gave %v, want EOF", err)
	}
	if !strings.Contains(logs.String(), "max_clients="+strconv.Itoa(maxClients)) {
		t.Errorf("the refusal was not logged:\n%s", logs)
	}

	// A burst of them: each gets its answer, not just a closed connection.
	const burst = 100
	answers := make(chan string, burst)
	for i := 0; i < burst; i++ {
		go func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				answers <- err.Error()
				return
			}
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				answers <- err.Error()
				return
			}
			resp.Body.Close()
			answers <- resp.Status
		}()
	}
	for i := 0; i < burst; i++ {
		if a := <-answers; a != "503 Service Unavailable" {
			t.Errorf("connection %d of a burst past %d busy ones: %s, want 503", i, maxClients, a)
		}
	}

	// The busy connections were kept, and finish as they would have.
	for i, c := range busy {
		io.WriteString(c, "{}")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("busy connection %d: %v", i, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("busy connection %d: %d after its body, want 400", i, resp.StatusCode)
		}
	}
}

func TestRunChecksHostWithoutToken(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	for _, tt := range []struct {
		addr, token string
		checked     bool
	}{
		{"127.0.0.1:0", "", true},
		{"127.0.0.1:0", "set", false},
		{"0.0.0.0:0", "", false},
	} {
		ctx, cancel := context.WithCancel(context.Background())
		addr, _, done := startRun(t, ctx, map[string]string{"DATABASE_URL": databaseURL, "ADDR": tt.addr, "API_TOKEN": tt.token})
		_, port, _ := net.SplitHostPort(addr)
		e := &testEnv{t: t, url: "http://127.0.0.1:" + port}
		r := e.do("GET", "/healthz", "", "Host: evil.example:"+port)
		if got := r.status == http.StatusMisdirectedRequest; got != tt.checked {
			t.Errorf("ADDR=%s API_TOKEN=%q: %s; want 421: %v", tt.addr, tt.token, r, tt.checked)
		}
		if r := e.do("GET", "/healthz", "", "Host: localhost:"+port); r.status != http.StatusOK {
			t.Errorf("ADDR=%s API_TOKEN=%q: %s with Host localhost, want 200", tt.addr, tt.token, r)
		}
		cancel()
		waitStopped(t, done)
	}
}

func TestHelp(t *testing.T) {
	t.Parallel()
	// A bad setting in the environment does not stop -h.
	env := map[string]string{"BCRYPT_COST": "3", "PORT": "x"}
	for _, arg := range []string{"-h", "-help", "--help"} {
		var stdout, stderr syncBuffer
		if err := run(context.Background(), []string{arg}, func(k string) string { return env[k] }, &stdout, &stderr); err != nil {
			t.Fatalf("run %s = %v, want nil", arg, err)
		}
		help := stdout.String()
		if first, _, _ := strings.Cut(help, "\n"); first != "users serves a user-management REST API backed by PostgreSQL." {
			t.Errorf("run %s: first line %q, want what the program is", arg, first)
		}
		if stderr.String() != "" {
			t.Errorf("run %s wrote to stderr: %q", arg, stderr.String())
		}
		// Every setting, by its variable, flag and default.
		wants := []string{
			"DATABASE_URL, -database-url", "default: " + defaultDatabaseURL,
			"PORT\n", "ADDR, -addr", "default: 127.0.0.1:8000",
			"BCRYPT_COST, -bcrypt-cost", "default: 12",
			"DB_MAX_CONNS\n", "default: 16", "API_TOKEN\n", "GOMAXPROCS\n",
			"-version\n",
		}
		for _, st := range settings() {
			wants = append(wants, "  "+st.env, st.usage)
			if st.flag != "" {
				wants = append(wants, ", -"+st.flag+"\n")
			}
			if st.def != "" {
				wants = append(wants, "default: "+st.def+"\n")
			}
		}
		for _, want := range wants {
			if !strings.Contains(help, want) {
				t.Errorf("run %s: help does not have %q:\n%s", arg, want, help)
			}
		}
	}
}

func TestVersion(t *testing.T) {
	t.Parallel()
	var stdout, stderr syncBuffer
	env := map[string]string{"BCRYPT_COST": "3"}
	if err := run(context.Background(), []string{"-version"}, func(k string) string { return env[k] }, &stdout, &stderr); err != nil {
		t.Fatalf("run -version = %v, want nil", err)
	}
	if !regexp.MustCompile(`^users \S+( [0-9a-f]{7} \S+)?\n$`).MatchString(stdout.String()) || stderr.String() != "" {
		t.Errorf("run -version: stdout %q, stderr %q; want one line \"users <version> [<revision> <time>]\"", stdout.String(), stderr.String())
	}

	vcs := []debug.BuildSetting{
		{Key: "-compiler", Value: "gc"},
		{Key: "vcs.time", Value: "2026-11-28T10:00:00Z"},
		{Key: "vcs.revision", Value: "5ba070a1b2c3d4e5f60718293a4b5c6d7e8f9012"},
		{Key: "vcs.modified", Value: "false"},
	}
	for _, tt := range []struct {
		version  string
		settings []debug.BuildSetting
		want     string
	}{
		{"(devel)", vcs, "users (devel) 5ba070a 2026-11-28T10:00:00Z"},
		{"v1.2.3", vcs, "users v1.2.3 5ba070a 2026-11-28T10:00:00Z"},
		{"(devel)", nil, "users (devel)"},
		{"", nil, "users (devel)"},
	} {
		info := &debug.BuildInfo{Main: debug.Module{Path: "users", Version: tt.version}, Settings: tt.settings}
		if got := formatVersion(info); got != tt.want {
			t.Errorf("formatVersion(%q, %d settings) = %q, want %q", tt.version, len(tt.settings), got, tt.want)
		}
	}
}

// TestSettingErrorsNameTheirSource checks that an error names the setting
// the way it was given: the flag if it came from a flag, the variable if
// from the environment.
func TestSettingErrorsNameTheirSource(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	down := "postgres://ann:hunter2@" + closedAddr(t) + "/db?sslmode=disable"
	tests := []struct {
		name   string
		env    map[string]string
		args   []string
		prefix string
	}{
		{"cost variable", map[string]string{"BCRYPT_COST": "3"}, nil, "BCRYPT_COST: "},
		{"cost flag", nil, []string{"-bcrypt-cost", "3"}, "-bcrypt-cost: "},
		{"cost flag over a good variable", map[string]string{"BCRYPT_COST": "12"}, []string{"-bcrypt-cost=3"}, "-bcrypt-cost: "},
		{"pool size", map[string]string{"DB_MAX_CONNS": "x"}, nil, "DB_MAX_CONNS: "},
		{"port", map[string]string{"PORT": "0"}, nil, "PORT: "},
		{"address variable", map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:-1"}, nil, "ADDR: "},
		{"address flag", map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0"}, []string{"-addr", "127.0.0.1:-1"}, "-addr: "},
		{"database variable", map[string]string{"DATABASE_URL": down}, nil, "DATABASE_URL: "},
		{"database flag", map[string]string{"DATABASE_URL": databaseURL}, []string{"-database-url", down}, "-database-url: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := run(context.Background(), tt.args, func(k string) string { return tt.env[k] }, io.Discard, io.Discard)
			if err == nil || !strings.HasPrefix(err.Error(), tt.prefix) {
				t.Errorf("run(%q, %v) = %v, want an error starting %q", tt.args, tt.env, err, tt.prefix)
			}
		})
	}
}

func TestStartLogNamesTheDatabase(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	// The test server trusts every local role, so any password will do.
	databaseURL = withParam(databaseURL, "password", "hunter2-secret")
	pqcfg, err := pq.NewConfig(databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	var name string
	if err := adminDB.QueryRow(`SELECT current_database()`).Scan(&name); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	_, logs, done := startRun(t, ctx, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "BCRYPT_COST": "10"})
	cancel()
	waitStopped(t, done)
	line, _, _ := strings.Cut(logs.String()[strings.Index(logs.String(), "msg=listening"):], "\n")
	want := fmt.Sprintf("database.host=%s database.port=%d database.name=%s ", pqcfg.Host, pqcfg.Port, name)
	if !strings.Contains(line, want) {
		t.Errorf("start log %q does not have %q", line, want)
	}
	if strings.Contains(logs.String(), "hunter2") {
		t.Errorf("the log holds the database password:\n%s", logs)
	}
}

func TestLoadConfigPooler(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		env     map[string]string
		args    []string
		want    bool   // transactionPooler
		wantErr string // in the error, if one is wanted
	}{
		{"default", nil, nil, false, ""},
		{"none", map[string]string{"DB_POOLER": "none"}, nil, false, ""},
		{"transaction", map[string]string{"DB_POOLER": "transaction"}, nil, true, ""},
		{"flag wins over environment", map[string]string{"DB_POOLER": "transaction"}, []string{"-db-pooler", "none"}, false, ""},
		{"flag", nil, []string{"-db-pooler", "transaction"}, true, ""},
		{"unknown mode", map[string]string{"DB_POOLER": "session"}, nil, false, `DB_POOLER: must be "none" or "transaction", got "session"`},
		{"unknown mode by flag", nil, []string{"-db-pooler", "Transaction"}, false, `-db-pooler: must be "none" or "transaction", got "Transaction"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := loadConfig(tt.args, func(k string) string { return tt.env[k] }, io.Discard)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Errorf("loadConfig(%q) error = %v, want %q", tt.args, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.pool.transactionPooler != tt.want {
				t.Errorf("loadConfig(%q) transactionPooler = %v, want %v", tt.args, got.pool.transactionPooler, tt.want)
			}
		})
	}
}

func TestParseDatabaseURL(t *testing.T) {
	t.Parallel()
	accepted := []struct{ name, value, want string }{
		{"URL", "postgres://ann:se%20cret@db.example.com:6432/users?sslmode=require",
			"user='ann' password='se cret' host='db.example.com' port='6432' dbname='users' sslmode='require'"},
		{"postgresql scheme, upper case", "POSTGRESQL://db/users", "host='db' dbname='users'"},
		{"in double quotes, with spaces", ` "postgres://db/users" `, "host='db' dbname='users'"},
		{"in single quotes", `'postgres://db/users'`, "host='db' dbname='users'"},
		{"hosts with ports", "postgres://h1:5432,h2:5433/db?target_session_attrs=read-write",
			"host='h1,h2' port='5432,5433' dbname='db' target_session_attrs='read-write'"},
		{"hosts, ports as a parameter", "postgres://h1,h2/db?port=5432,5433",
			"host='h1,h2' dbname='db' port='5432,5433'"},
		{"a host without its port", "postgres://h1,h2:5433/db", "host='h1,h2' port='5432,5433' dbname='db'"},
		{"IPv6 hosts", "postgres://[::1]:5432,[2001:db8::1]/db", "host='::1,2001:db8::1' port='5432,5432' dbname='db'"},
		{"socket directory", "postgres://%2Fvar%2Frun%2Fpostgresql/db", "host='/var/run/postgresql' dbname='db'"},
		{"host as a parameter", "postgres:///db?host=/tmp", "dbname='db' host='/tmp'"},
		{"key=value", "host=h1,h2 port=5432,5433 dbname=db target_session_attrs=read-write",
			"host='h1,h2' port='5432,5433' dbname='db' target_session_attrs='read-write'"},
		{"key=value, quoted and escaped", `user = ann password='it\'s a secret' dbname=a\ b`,
			`user='ann' password='it\'s a secret' dbname='a b'`},
	}
	for _, tt := range accepted {
		got, err := parseDatabaseURL(tt.value)
		if err != nil || got != tt.want {
			t.Errorf("%s: parseDatabaseURL(%q) = %q, %v; want %q", tt.name, tt.value, got, err, tt.want)
		}
	}

	// Each holds the password hunter2 and the host secret-host: an error
	// may show neither.
	refused := []struct{ name, value string }{
		{"another scheme", "postgresql+asyncpg://ann:hunter2@secret-host/db"},
		{"a misspelt scheme", "postgress://ann:hunter2@secret-host/db"},
		{"no scheme", "ann:hunter2@secret-host/db"},
		{"a port that is not a number", "postgres://ann:hunter2@secret-host:port/db"},
		{"a port out of range", "postgres://ann:hunter2@secret-host:65536/db"},
		{"an empty host in the list", "postgres://ann:hunter2@secret-host,,h2/db"},
		{"IPv6 without brackets", "postgres://ann:hunter2@::1/db?host=secret-host"},
		{"a fragment", "postgres://ann:hunter2@secret-host/db#x"},
		{"a '/' in the password", "postgres://ann:12/hunter2@secret-host/db"},
		{"a bad escape", "postgres://ann:hunter%2@secret-host/db"},
		{"a query key that is no setting", "postgres://ann:hunter2@secret-host/db?ssl+mode=x"},
		{"an unbalanced quote", `"postgres://ann:hunter2@secret-host/db`},
		{"a stray word", "host=secret-host user=ann password=hunter2 hunter3"},
		{"a password cut by a space", "host=secret-host password=hunter2 and more"},
		{"an unterminated quote", "host=secret-host password='hunter2"},
		{"empty", " "},
		{"empty quotes", `""`},
	}
	for _, tt := range refused {
		_, err := parseDatabaseURL(tt.value)
		if err == nil {
			t.Errorf("%s: parseDatabaseURL(%q) succeeded, want an error", tt.name, tt.value)
			continue
		}
		msg := err.Error()
		if strings.Contains(msg, "\n") || strings.Contains(msg, "hunter") || strings.Contains(msg, "secret") {
			t.Errorf("%s: error %q, want one line that shows nothing of the value", tt.name, msg)
		}
	}
	// lib/pq's own checks still apply, and may name the setting at fault.
	if _, err := parseDatabaseURL("postgres://ann:hunter2@db/x?sslmode=sometimes"); err == nil ||
		!strings.Contains(err.Error(), "sslmode") || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("bad sslmode: error %v, want one naming sslmode and not the password", err)
	}
}

func TestRunNamesEveryDatabaseHost(t *testing.T) {
	t.Parallel()
	a, b := closedAddr(t), closedAddr(t)
	_, portA, _ := net.SplitHostPort(a)
	_, portB, _ := net.SplitHostPort(b)
	for _, databaseURL := range []string{
		"postgres://ann:hunter2@" + a + "," + b + "/db?sslmode=disable&target_session_attrs=read-write",
		"POSTGRES://ann:hunter2@127.0.0.1,127.0.0.1/db?port=" + portA + "," + portB + "&sslmode=disable",
		"host=127.0.0.1,127.0.0.1 port=" + portA + "," + portB + " user=ann password=hunter2 sslmode=disable",
	} {
		err := run(context.Background(), nil, func(k string) string {
			return map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0"}[k]
		}, io.Discard, io.Discard)
		if err == nil {
			t.Fatalf("run with no database at %s or %s succeeded", a, b)
		}
		msg := err.Error()
		if !strings.Contains(msg, "DATABASE_URL") || strings.Contains(msg, "\n") || strings.Contains(msg, "hunter2") {
			t.Errorf("run = %q, want one line naming DATABASE_URL, free of the password", msg)
		}
		if want := "at " + a + ", " + b + ":"; !strings.Contains(msg, want) {
			t.Errorf("run = %q, want it to name every host: %q", msg, want)
		}
	}
}

func TestRunRefusesMistypedDatabaseURL(t *testing.T) {
	t.Parallel()
	// Values that lib/pq alone reads as key=value settings: it quotes them
	// whole in its error, or connects to localhost:5432 and sends the URL
	// as a setting's name, into the server's log. Quotes and spaces around
	// a URL are dropped and the URL read as such; the others are refused.
	down := closedAddr(t)
	for _, tt := range []struct {
		value string
		want  string // the error's start
	}{
		{`"postgres://ann:hunter2@` + down + `/db?sslmode=disable"`, "DATABASE_URL: cannot use the database at " + down + ":"},
		{` postgres://ann:hunter2@` + down + `/db?sslmode=disable`, "DATABASE_URL: cannot use the database at " + down + ":"},
		{`postgresql+asyncpg://ann:hunter2@` + down + `/db?sslmode=disable`, "DATABASE_URL: the URL's scheme must be"},
		{`postgress://ann:hunter2@` + down + `/db?sslmode=disable`, "DATABASE_URL: the URL's scheme must be"},
		{`host=127.0.0.1 user=ann password=hunter2 hunter3 dbname=db`, "DATABASE_URL: not a postgres:// URL, nor key=value settings"},
	} {
		var stdout, stderr syncBuffer
		err := run(context.Background(), nil, func(k string) string {
			return map[string]string{"DATABASE_URL": tt.value, "ADDR": "127.0.0.1:0"}[k]
		}, &stdout, &stderr)
		if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
			t.Errorf("DATABASE_URL=%s: run = %v, want an error starting %q", tt.value, err, tt.want)
		}
		if out := fmt.Sprint(err) + stdout.String() + stderr.String(); strings.Contains(out, "hunter") {
			t.Errorf("DATABASE_URL=%s: the output shows the password: %s", tt.value, out)
		}
	}
}

func TestSlowHeadersAreCut(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withServer(func(s *http.Server) { s.ReadHeaderTimeout = 200 * time.Millisecond }))
	conn, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	closed := make(chan struct{})
	go func() {
		conn.Read(make([]byte, 1024)) // returns when the server gives up on us
		close(closed)
	}()
	request := "GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\n\r\n"
	for i := 0; i < len(request); i++ {
		select {
		case <-closed:
			t.Logf("cut after %d of %d header bytes", i, len(request))
			return
		case <-time.After(50 * time.Millisecond): // the trickle would take 2.5s
		}
		if _, err := conn.Write([]byte{request[i]}); err != nil {
			return // cut
		}
	}
	select {
	case <-closed:
	case <-time.After(time.Second):
		t.Fatal("the server waited for the whole trickled header")
	}
	t.Error("the server read a whole header trickled far past ReadHeaderTimeout")
}

func TestIdleConnectionsDoNotBlockNewClients(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	addr := strings.TrimPrefix(e.url, "http://")
	const idle = 1000
	conns := make([]net.Conn, 0, idle)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, idle)
	for i := 0; i < idle; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			// One request, then the connection idles, kept alive.
			fmt.Fprintf(c, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				errs <- err
				return
			}
			resp.Body.Close()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("opening idle connections: %v", err)
	}
	if r := e.do("GET", "/healthz", ""); r.status != http.StatusOK {
		t.Errorf("%s with %d idle connections open, want 200", r, idle)
	}
}

func TestIdleConnectionsAreClosed(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withServer(func(s *http.Server) { s.IdleTimeout = 200 * time.Millisecond }))
	c, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); err == nil {
		t.Fatal("the server sent more on an idle connection")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("an idle keep-alive connection was still open after 5s")
	}
}

func TestGracefulShutdownUnderLoad(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	databaseURL = withParam(databaseURL, "application_name", schema)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Each hash takes tens of milliseconds at cost 10 (far more under the
	// race detector), and run lets them use every P but one: the creates
	// queue up, and are still in flight when the shutdown begins.
	addr, _, done := startRun(t, ctx, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "BCRYPT_COST": "10"})
	e := &testEnv{t: t, url: "http://" + addr}
	const creates = 3
	results := make(chan response, creates+1)
	for i := 0; i < creates; i++ {
		go func(i int) {
			results <- e.do("POST", "/users/", userBody("Ann", "Lee", fmt.Sprintf("u%d@example.com", i), "password1"))
		}(i)
	}
	go func() { results <- e.do("GET", "/users/?limit=5", "") }()
	// One create is surely in flight: its body is only half sent when the
	// shutdown begins, and the rest follows after.
	slowBody, rest := io.Pipe()
	slow := make(chan int, 1)
	go func() {
		resp, err := noRedirects.Post(e.url+"/users/", "application/json", slowBody)
		if err != nil {
			t.Errorf("POST with a slow body: %v", err)
			slow <- 0
			return
		}
		resp.Body.Close()
		slow <- resp.StatusCode
	}()
	rest.Write([]byte(`{"first_name":"Slow","last_name":"Body",`))
	time.Sleep(150 * time.Millisecond) // the requests are in; the hashes are not done
	cancel()

	// New connections are refused while the requests in flight finish.
	refused := false
	for i := 0; i < 100 && !refused; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			refused = true
		} else {
			c.Close()
			time.Sleep(10 * time.Millisecond)
		}
	}
	if !refused {
		t.Error("new connections were still accepted 1s after shutdown began")
	}
	select {
	case status := <-slow:
		t.Fatalf("the slow create answered %d before its body was complete", status)
	default:
	}
	rest.Write([]byte(`"email":"slow@example.com","password":"password1"}`))
	rest.Close()
	if status := <-slow; status != http.StatusCreated {
		t.Errorf("the create whose body came during shutdown answered %d, want 201", status)
	}
	created := 0
	for i := 0; i < creates+1; i++ {
		r := <-results
		switch {
		case strings.HasPrefix(r.what, "POST") && r.status == http.StatusCreated:
			created++
		case strings.HasPrefix(r.what, "GET") && r.status == http.StatusOK:
		default:
			t.Errorf("%s during shutdown, want its normal answer", r)
		}
	}
	if created != creates {
		t.Errorf("%d of %d creates in flight completed", created, creates)
	}
	waitStopped(t, done)
	waitNoConnections(t, schema)
}

func TestTokenWarningOnOpenAddress(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	for _, tt := range []struct {
		addr, token string
		warn        bool
	}{
		{"127.0.0.1:0", "", false},
		{"0.0.0.0:0", "", true},
		{"0.0.0.0:0", "set", false},
	} {
		ctx, cancel := context.WithCancel(context.Background())
		_, logs, done := startRun(t, ctx, map[string]string{"DATABASE_URL": databaseURL, "ADDR": tt.addr, "API_TOKEN": tt.token})
		cancel()
		waitStopped(t, done)
		if got := strings.Contains(logs.String(), "API_TOKEN is not set"); got != tt.warn {
			t.Errorf("ADDR=%s API_TOKEN=%q: warning logged = %v, want %v\n%s", tt.addr, tt.token, got, tt.warn, logs)
		}
	}
}

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

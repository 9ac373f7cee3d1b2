package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

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

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
	create := `{"first_name":"Down","last_name":"Time","email":"down@example.com","password":"password1"}`
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
		s.err = run(ctx, nil, func(k string) string { return env[k] }, s.logs, io.Discard)
	}()
	t.Cleanup(func() { s.stop(t) })
	listening := regexp.MustCompile(`msg=listening addr=\S+:(\d+) `)
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
	r := s.do("POST", "/users", `{"first_name":"Ann","last_name":"Lee","email":"ann@example.com","password":"password1"}`)
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
	several := "host=h1,h2 port=5432,5433 dbname=db password=hunter2"
	if got, want := databaseAttr(several).String(), "database=[host=h1,h2 port=5432,5433 name=db]"; got != want {
		t.Errorf("databaseAttr(%q) = %s, want %s: every host, no password", several, got, want)
	}
	// The user was stored, hashed at the cost BCRYPT_COST set.
	var hash string
	if err := adminDB.QueryRow(`SELECT password FROM `+schema+`.users WHERE id = $1`, u.ID).Scan(&hash); err != nil ||
		!strings.HasPrefix(hash, "$2a$10$") {
		t.Errorf("stored hash of user %d: %.7q, %v; want cost 10 from BCRYPT_COST", u.ID, hash, err)
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

// TestRunRefusesBadConfiguration checks that run refuses what it cannot use
// with one line that starts with the setting, named as it was given (the
// flag if it came from a flag), and shows no password: each value here
// that holds one holds hunter2.
func TestRunRefusesBadConfiguration(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	down, other := closedAddr(t), closedAddr(t)
	downURL := "postgres://ann:hunter2@" + down + "/db?sslmode=disable"
	type env = map[string]string
	tests := []struct {
		name  string
		env   env
		args  []string
		want  string   // the error's start
		wants []string // also in the error
	}{
		{"cost not a number", env{"BCRYPT_COST": "twelve"}, nil, "BCRYPT_COST: ", []string{`"twelve"`}},
		{"cost too low", env{"BCRYPT_COST": "9"}, nil, "BCRYPT_COST: ", []string{"10 to 15"}},
		{"cost too high", env{"BCRYPT_COST": "16"}, nil, "BCRYPT_COST: ", []string{"10 to 15"}},
		{"cost flag over a good variable", env{"BCRYPT_COST": "12"}, []string{"-bcrypt-cost=4"}, "-bcrypt-cost: ", []string{"10 to 15"}},
		{"pool size", env{"DB_MAX_CONNS": "0"}, nil, "DB_MAX_CONNS: ", nil},
		{"pool beyond the file limit", env{"DB_MAX_CONNS": "100000000"}, nil, "DB_MAX_CONNS: ", []string{"no room"}},
		{"pooler mode", env{"DB_POOLER": "session"}, nil, `DB_POOLER: must be "none" or "transaction", got "session"`, nil},
		{"pooler flag", nil, []string{"-db-pooler", "Transaction"}, "-db-pooler: ", []string{`"Transaction"`}},
		{"token with spaces", env{"API_TOKEN": "tok "}, nil, "API_TOKEN: ", []string{"white space"}},
		{"stream limit", env{"MAX_STREAMS": "x"}, nil, "MAX_STREAMS: ", []string{`"x"`}},
		{"client limit", env{"MAX_CLIENTS": "0"}, nil, "MAX_CLIENTS: ", nil},
		{"client limit flag", nil, []string{"-max-clients", "many"}, "-max-clients: ", []string{`"many"`}},
		{"GOMAXPROCS not a number", env{"GOMAXPROCS": "abc"}, nil, "GOMAXPROCS: ", []string{`"abc"`}},
		{"stray argument", nil, []string{"serve"}, "unexpected arguments", nil},
		{"unknown flag", nil, []string{"-nope"}, "", []string{"-nope"}},
		{"port not a number", env{"PORT": "http"}, nil, "PORT: ", []string{`"http"`}},
		{"port out of range", env{"PORT": "65536"}, nil, "PORT: ", nil},
		{"address variable", env{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:-1"}, nil, "ADDR: ", nil},
		{"address flag", env{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0"}, []string{"-addr", "127.0.0.1:-1"}, "-addr: ", nil},
		{"database flag", env{"DATABASE_URL": databaseURL}, []string{"-database-url", downURL}, "-database-url: cannot use the database at " + down + ":", nil},
		{"database URL in quotes", env{"DATABASE_URL": `"` + downURL + `"`}, nil, "DATABASE_URL: cannot use the database at " + down + ":", nil},
		{"database settings with a stray word", env{"DATABASE_URL": "host=127.0.0.1 user=ann password=hunter2 hunter3 dbname=db"}, nil,
			"DATABASE_URL: not a postgres:// URL, nor key=value settings", nil},
		{"database hosts", env{"DATABASE_URL": "postgres://ann:hunter2@" + down + "," + other + "/db?sslmode=disable"}, nil,
			"DATABASE_URL: cannot use the database at " + down + ", " + other + ":", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr syncBuffer
			err := run(context.Background(), tt.args, func(k string) string { return tt.env[k] }, &stdout, &stderr)
			if err == nil {
				t.Fatalf("run(%q, %v) succeeded, want an error", tt.args, tt.env)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, tt.want) || strings.Contains(msg, "\n") {
				t.Errorf("run(%q, %v) = %q, want one line starting %q", tt.args, tt.env, msg, tt.want)
			}
			for _, want := range tt.wants {
				if !strings.Contains(msg, want) {
					t.Errorf("run(%q, %v) = %q, want it to mention %q", tt.args, tt.env, msg, want)
				}
			}
			if out := msg + stdout.String() + stderr.String(); strings.Contains(out, "hunter") || stderr.String() != "" {
				t.Errorf("run(%q, ...) wrote %q to stderr, or showed the password: %s", tt.args, stderr.String(), out)
			}
		})
	}
}

func TestLoadConfig(t *testing.T) {
	t.Parallel()
	defaults := config{addr: defaultAddr, databaseURL: defaultDatabaseURL, bcryptCost: defaultBcryptCost, maxStreams: defaultMaxStreams,
		pool: poolConfig{maxOpen: 16, maxIdle: 16, maxIdleTime: 5 * time.Minute}}
	defaults.maxClients, _ = parseMaxClients("", fileLimit(), defaults.pool.maxOpen)
	with := func(change func(*config)) config {
		c := defaults
		change(&c)
		return c
	}
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want config
	}{
		{"defaults", nil, nil, defaults},
		{"platform PORT", map[string]string{"PORT": "9000"}, nil, with(func(c *config) { c.addr = ":9000" })},
		{"ADDR wins over PORT", map[string]string{"PORT": "9000", "ADDR": "0.0.0.0:80"}, nil, with(func(c *config) { c.addr = "0.0.0.0:80" })},
		{"environment", map[string]string{
			"DATABASE_URL": "postgres://db/x", "BCRYPT_COST": "10", "API_TOKEN": "t", "DB_MAX_CONNS": "8",
			"DB_POOLER": "transaction", "MAX_STREAMS": "5", "MAX_CLIENTS": "100",
		}, nil, with(func(c *config) {
			c.databaseURL, c.bcryptCost, c.apiToken, c.maxStreams, c.maxClients = "postgres://db/x", 10, "t", 5, 100
			c.pool.maxOpen, c.pool.maxIdle, c.pool.transactionPooler = 8, 8, true
		})},
		{"flags win over the environment", map[string]string{
			"ADDR": ":1", "DATABASE_URL": "postgres://a/", "BCRYPT_COST": "10", "DB_POOLER": "transaction", "MAX_STREAMS": "5", "MAX_CLIENTS": "100",
		}, []string{
			"-addr", ":2", "-database-url", "postgres://b/", "-bcrypt-cost", "15", "-db-pooler", "none", "-max-streams", "6", "-max-clients", "200",
		}, with(func(c *config) {
			c.addr, c.databaseURL, c.bcryptCost, c.maxStreams, c.maxClients = ":2", "postgres://b/", 15, 6, 200
		})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := loadConfig(tt.args, func(k string) string { return tt.env[k] }, io.Discard)
			if err != nil {
				t.Fatalf("loadConfig(%q, %v) = %v", tt.args, tt.env, err)
			}
			// Where a value came from shows in errors: see
			// TestRunRefusesBadConfiguration.
			got.maxClientsSet, got.maxClientsFrom, got.addrFrom, got.databaseURLFrom = "", "", "", ""
			if got != tt.want {
				t.Errorf("loadConfig(%q, %v) = %+v, want %+v", tt.args, tt.env, got, tt.want)
			}
		})
	}
}

func TestParseMaxClients(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		value     string
		fileLimit uint64
		pool      int
		want      int // 0: an error
	}{
		{"", 1024, 16, 1024 - 16 - fileReserve},
		{"", 1 << 20, 16, maxDefaultClients},
		{"", 100, 16, 20},
		{"", 80, 16, 0},
		{"944", 1024, 16, 944},
		{"945", 1024, 16, 0},
		{"0", 1024, 16, 0},
		{"many", 1024, 16, 0},
	} {
		got, err := parseMaxClients(tt.value, tt.fileLimit, tt.pool)
		if got != tt.want || (err == nil) != (tt.want != 0) {
			t.Errorf("parseMaxClients(%q, %d, %d) = %d, %v; want %d", tt.value, tt.fileLimit, tt.pool, got, err, tt.want)
		}
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
		{"a URL as a setting", "dbname=postgres://ann:hunter2@secret-host/db"},
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
		return fmt.Sprintf(`{"first_name":"Ann","last_name":"Lee","email":"u%d@example.com","password":"password1"}`, i)
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

// TestHelpAndVersion checks that -h prints what the program is and every
// setting, by its variable, flag and default, and -version one line, both
// whatever the environment holds.
func TestHelpAndVersion(t *testing.T) {
	t.Parallel()
	help := []string{"users serves a user-management REST API backed by PostgreSQL.\n", "-version\n"}
	for _, st := range settings() {
		help = append(help, "  "+st.env, st.usage)
		if st.flag != "" {
			help = append(help, ", -"+st.flag+"\n")
		}
		if st.def != "" {
			help = append(help, "default: "+st.def+"\n")
		}
	}
	version := regexp.MustCompile(`^users \S+( [0-9a-f]{7} \S+)?\n$`)
	env := map[string]string{"BCRYPT_COST": "3", "PORT": "x"}
	for _, arg := range []string{"-h", "-help", "--help", "-version"} {
		var stdout, stderr syncBuffer
		err := run(context.Background(), []string{arg}, func(k string) string { return env[k] }, &stdout, &stderr)
		if err != nil || stderr.String() != "" {
			t.Errorf("run %s = %v, stderr %q; want nil and nothing on stderr", arg, err, stderr.String())
		}
		out := stdout.String()
		if arg == "-version" {
			if !version.MatchString(out) {
				t.Errorf("run -version: %q, want one line \"users <version> [<revision> <time>]\"", out)
			}
			continue
		}
		if !strings.HasPrefix(out, help[0]) {
			t.Errorf("run %s: %q, want it to start with what the program is", arg, out)
		}
		for _, want := range help {
			if !strings.Contains(out, want) {
				t.Errorf("run %s: help does not have %q:\n%s", arg, want, out)
			}
		}
	}
}

func TestFormatVersion(t *testing.T) {
	t.Parallel()
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

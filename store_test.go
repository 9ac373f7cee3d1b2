package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	osuser "os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lib/pq"
	"golang.org/x/crypto/bcrypt"
)

func TestSchemaIsIdempotentAndSafeForReplicas(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	// Several replicas boot at once on an empty database.
	errs := make(chan error, 4)
	for range cap(errs) {
		go func() {
			st, err := openStore(context.Background(), databaseURL, testPool, 5*time.Second)
			if err == nil {
				st.Close()
			}
			errs <- err
		}()
	}
	for range cap(errs) {
		if err := <-errs; err != nil {
			t.Errorf("openStore by one of %d replicas booting at once: %v", cap(errs), err)
		}
	}
	// A restart keeps what is stored.
	seedUsers(t, newStoreAt(t, databaseURL), 3)
	if users, err := newStoreAt(t, databaseURL).Users(context.Background(), 0, 10); err != nil || len(users) != 3 {
		t.Errorf("Users after a restart: %d users (%v), want 3", len(users), err)
	}
}

// TestOldDatabaseIsUpgraded boots on a table made by the schema before
// users had a version: its users get one, and ETags work on them.
func TestOldDatabaseIsUpgraded(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	old, err := os.ReadFile("testdata/schema-before-version.sql")
	if err != nil {
		t.Fatal(err)
	}
	db := openDB(t, databaseURL)
	if _, err := db.Exec(string(old) + `; INSERT INTO users (first_name, last_name, email, password, salt) VALUES ('Ann', 'Lee', 'ann@example.com', 'x', 'y')`); err != nil {
		t.Fatalf("the old schema: %v", err)
	}
	e := newTestEnv(t, withStore(newStoreAt(t, databaseURL)))
	for _, step := range []struct{ method, body, header, etag string }{
		{"GET", "", "", `"1"`},
		{"PUT", `{"first_name":"Anna"}`, `If-Match: "1"`, `"2"`},
		{"GET", "", "", `"2"`},
	} {
		if r := e.do(step.method, "/users/1", step.body, step.header); r.status != http.StatusOK || r.header.Get("ETag") != step.etag {
			t.Errorf("%s, ETag %q; want 200, ETag %s", r, r.header.Get("ETag"), step.etag)
		}
		newStoreAt(t, databaseURL) // a boot on the upgraded table changes nothing
	}
}

// TestOldAddressesAreBroughtToNFC boots on rows stored before addresses
// were normalized: each is brought to NFC, unless another account has that
// spelling already; then both keep theirs, and the boot succeeds.
func TestOldAddressesAreBroughtToNFC(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	st := newStoreAt(t, databaseURL)
	old := []string{"ju\u0308rgen@example.com", "zöe@example.com", "zo\u0308e@example.com", "a\u0302\u0323@example.com", "a\u0323\u0302@example.com"}
	want := []string{"jürgen@example.com", "zöe@example.com", "zo\u0308e@example.com", "ậ@example.com", "a\u0323\u0302@example.com"}
	for _, email := range old {
		if _, err := st.db.Exec(`INSERT INTO users (first_name, last_name, email, password, salt) VALUES ('A', 'B', $1, 'x', 'x')`, email); err != nil {
			t.Fatal(err)
		}
	}
	users, err := newStoreAt(t, databaseURL).Users(context.Background(), 0, 10)
	if err != nil || len(users) != len(want) {
		t.Fatalf("Users after a boot: %v, %v", users, err)
	}
	for i, u := range users {
		if u.Email != want[i] {
			t.Errorf("stored as %+q, after a boot %+q, want %+q", old[i], u.Email, want[i])
		}
	}
}

func TestStorePassesTheContext(t *testing.T) {
	t.Parallel()
	st := newTestStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := st.Users(ctx, 0, 10); !errors.Is(err, context.Canceled) {
		t.Errorf("Users with a cancelled context: err = %v, want context.Canceled", err)
	}
	if _, err := st.User(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Errorf("User with a cancelled context: err = %v, want context.Canceled", err)
	}
	if _, err := st.CreateUser(ctx, newUser{"Ann", "Lee", "ann@example.com", passwordHash{"$2a$04$" + strings.Repeat("x", 53), "$2a$04$" + strings.Repeat("x", 22)}}); !errors.Is(err, context.Canceled) {
		t.Errorf("CreateUser with a cancelled context: err = %v, want context.Canceled", err)
	}
}

// concurrently runs f(i) for i in [0, n) at once and returns the results.
func concurrently[T any](n int, f func(i int) T) []T {
	out := make([]T, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { out[i] = f(i) })
	}
	wg.Wait()
	return out
}

// tally counts the answers in rs by status, and fails the test on an answer
// whose status is not in want, or whose body lacks the detail want gives
// for it ("" for none).
func tally(t *testing.T, rs []response, want map[int]string) map[int]int {
	t.Helper()
	n := map[int]int{}
	for _, r := range rs {
		if detail, ok := want[r.status]; !ok || detail != "" && !strings.Contains(string(r.body), `"`+detail+`"`) {
			t.Errorf("%s, want one of %v", r, want)
			continue
		}
		n[r.status]++
	}
	return n
}

// concurrentWrites are races that the store must settle, each against a
// service whose table may hold other users. TestConcurrentWrites runs them
// on a direct connection, TestTransactionPooler through PgBouncer.
var concurrentWrites = []struct {
	name string
	run  func(t *testing.T, e *testEnv)
}{
	{"creates of one email: exactly one wins", func(t *testing.T, e *testEnv) {
		for round := range 10 {
			email := fmt.Sprintf("race%d@example.com", round)
			rs := concurrently(30, func(i int) response {
				if i%2 == 0 { // one address, in different cases
					return e.do("POST", "/users", userBody("Ann", "Lee", strings.ToUpper(email), "passw0rd-1"))
				}
				return e.do("POST", "/users", userBody("Ann", "Lee", email, "passw0rd-1"))
			})
			if n := tally(t, rs, map[int]string{201: "", 400: "Email already registered"}); n[201] != 1 {
				t.Errorf("round %d: %d of 30 creates of one email succeeded, want 1", round, n[201])
			}
			if users := mustList(t, e.do("GET", "/users?email="+email, "")); len(users) != 1 {
				t.Errorf("round %d: %d users with %s, want 1", round, len(users), email)
			}
		}
	}},
	{"updates to one email: exactly one wins", func(t *testing.T, e *testEnv) {
		ids := make([]int64, 20)
		for i := range ids {
			ids[i] = e.createUser(t, "User", "Racer", fmt.Sprintf("taker%d@example.com", i), "passw0rd-1").ID
		}
		rs := concurrently(len(ids), func(i int) response {
			return e.do("PUT", fmt.Sprintf("/users/%d", ids[i]), `{"email":"Wanted@Example.com"}`)
		})
		n := tally(t, rs, map[int]string{200: "", 400: "Email already registered"})
		var holders int
		if err := e.store.db.QueryRow(`SELECT count(*) FROM users WHERE email = 'wanted@example.com'`).Scan(&holders); err != nil {
			t.Fatal(err)
		}
		if n[200] != 1 || holders != 1 {
			t.Errorf("%d updates to one email succeeded and %d users hold it; want one, the same", n[200], holders)
		}
	}},
	{"deletes, updates and reads of one user: one delete wins", func(t *testing.T, e *testEnv) {
		for round := range 10 {
			u := e.createUser(t, "Ann", "Lee", fmt.Sprintf("deleted%d@example.com", round), "passw0rd-1")
			path := fmt.Sprintf("/users/%d", u.ID)
			rs := concurrently(12, func(i int) response {
				switch i % 3 {
				case 0:
					return e.do("DELETE", path, "")
				case 1:
					return e.do("PUT", path, fmt.Sprintf(`{"first_name":"Name%d"}`, i))
				}
				return e.do("GET", path, "")
			})
			if n := tally(t, rs, map[int]string{200: "", 204: "", 404: "User not found"}); n[204] != 1 {
				t.Errorf("round %d: %d deletes of one user succeeded, want 1", round, n[204])
			}
			mustError(t, e.do("GET", path, ""), http.StatusNotFound, "User not found")
		}
	}},
	{"updates with the same If-Match: exactly one wins", func(t *testing.T, e *testEnv) {
		for round := range 10 {
			u := e.createUser(t, "Ann", "Lee", fmt.Sprintf("matched%d@example.com", round), "passw0rd-1")
			rs := concurrently(2, func(i int) response {
				return e.do("PUT", fmt.Sprintf("/users/%d", u.ID), fmt.Sprintf(`{"last_name":"Writer%d"}`, i), `If-Match: "1"`)
			})
			if n := tally(t, rs, map[int]string{200: "", 412: "Precondition failed: the user has changed"}); n[200] != 1 {
				t.Errorf("round %d: %d of 2 updates with one If-Match succeeded, want 1", round, n[200])
			}
		}
	}},
	{"updates of different fields: none is lost", func(t *testing.T, e *testEnv) {
		for round := range 10 {
			u := e.createUser(t, "Ann", "Lee", fmt.Sprintf("fields%d@example.com", round), "passw0rd-1")
			path := fmt.Sprintf("/users/%d", u.ID)
			email := fmt.Sprintf("changed%d@example.com", round)
			bodies := []string{`{"first_name":"First"}`, `{"last_name":"Last"}`, `{"email":"` + email + `"}`, `{"password":"new password"}`}
			tally(t, concurrently(len(bodies), func(i int) response { return e.do("PUT", path, bodies[i]) }), map[int]string{200: ""})
			got := mustUser(t, e.do("GET", path, ""), http.StatusOK)
			if got.FirstName != "First" || got.LastName != "Last" || got.Email != email {
				t.Errorf("round %d: after concurrent updates of different fields: %+v", round, got)
			}
			if hash, _ := e.storedSecret(t, u.ID); bcrypt.CompareHashAndPassword([]byte(hash), []byte("new password")) != nil {
				t.Errorf("round %d: the password update was lost", round)
			}
		}
	}},
}

func TestConcurrentWrites(t *testing.T) {
	t.Parallel()
	for _, c := range concurrentWrites {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			c.run(t, newTestEnv(t))
		})
	}
}

// TestTransactionPooler drives the API through a real PgBouncer in
// transaction pooling mode, whose small pool hands each server connection to
// many client connections in turn: the concurrent writes settle as they do
// on a direct connection, and lists and pages read the table whole.
func TestTransactionPooler(t *testing.T) {
	t.Parallel()
	pool := poolConfig{maxOpen: 16, maxIdle: 16, maxIdleTime: time.Minute, transactionPooler: true}
	st := newStoreWith(t, startPgBouncer(t), pool, 30*time.Second)
	e := newTestEnv(t, withStore(st))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("service's log:\n%s", e.logs)
		}
	})
	for _, c := range concurrentWrites {
		t.Run(c.name, func(t *testing.T) { c.run(t, e) })
	}

	// Whole lists, first pages and look-ups by email at once, then the
	// pages that follow: each list reads the table whole.
	rs := concurrently(24, func(i int) response {
		switch i % 3 {
		case 0:
			return e.do("GET", "/users", "")
		case 1:
			return e.do("GET", fmt.Sprintf("/users?limit=%d", 2+i), "")
		}
		return e.do("GET", fmt.Sprintf("/users?email=race%d@example.com", i%10), "")
	})
	stored := countUsers(t, st)
	link := regexp.MustCompile(`^<([^>]+)>; rel="next"$`)
	var whole []userJSON
	for i, r := range rs {
		got := mustList(t, r)
		if i%3 == 2 {
			if len(got) != 1 {
				t.Errorf("%s: %d users, want 1", r.what, len(got))
			}
			continue
		}
		for m := link.FindStringSubmatch(r.header.Get("Link")); m != nil; m = link.FindStringSubmatch(r.header.Get("Link")) {
			r = e.do("GET", m[1], "")
			got = append(got, mustList(t, r)...)
		}
		if i == 0 {
			whole = got
		}
		if len(got) != stored || !slices.Equal(got, whole) {
			t.Errorf("%s and the pages after it: %d users, want the %d stored, as GET /users read them", rs[i].what, len(got), stored)
		}
	}
	// The premise: the service's connections outnumbered the server's.
	if open := st.db.Stats().OpenConnections; open <= pgBouncerPoolSize {
		t.Errorf("the service opened %d connections to PgBouncer, want more than its pool of %d", open, pgBouncerPoolSize)
	}
}

// pgBouncerPoolSize is the number of server connections PgBouncer keeps for
// the test's database: far fewer than the service's pool.
const pgBouncerPoolSize = 2

// startPgBouncer starts PgBouncer in transaction pooling mode in front of a
// database of its own, and returns the URL that reaches that database
// through it. Both are gone when the test ends.
//
// A database of its own, because PgBouncer refuses the search_path startup
// parameter that newSchema's URLs carry.
func startPgBouncer(t *testing.T) string {
	t.Helper()
	binary := serverProgram(t, "pgbouncer", "the pgbouncer package", "/usr/sbin")
	databaseURL, database := newDatabase(t)
	server, err := pq.NewConfig(databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	// PgBouncer listens on a socket in a directory of its own: no port to
	// find free, and no other process can reach it.
	dir := serverDir(t)
	conf := filepath.Join(dir, "pgbouncer.ini")
	if err := os.WriteFile(conf, []byte(pgBouncerConfig(server, database, dir)), 0o644); err != nil {
		t.Fatal(err)
	}
	out := &syncBuffer{}
	cmd := serverCommand(t, dir, binary, conf)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pgbouncer: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })

	bouncerURL := fmt.Sprintf("host=%s port=6432 user=%s dbname=%s sslmode=disable", dir, server.User, database)
	db := openDB(t, bouncerURL)
	waitUntil(t, "PgBouncer answers", func() bool {
		select {
		case <-exited:
			t.Fatalf("PgBouncer exited; its output:\n%s", out)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return db.PingContext(ctx) == nil
	})
	return bouncerURL
}

// pgBouncerConfig returns a PgBouncer configuration that listens on a
// socket in dir only (its port only names the socket), and pools transactions to database on server in a
// small pool. Clients need no password: PgBouncer logs in as server.User.
// It has no ignore_startup_parameters, so a startup parameter that PgBouncer
// refuses in production fails the test too.
func pgBouncerConfig(server pq.Config, database, dir string) string {
	quote := func(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
	target := fmt.Sprintf("host=%s port=%d dbname=%s user=%s", quote(server.Host), server.Port, database, quote(server.User))
	if server.Password != "" {
		target += " password=" + quote(server.Password)
	}
	return fmt.Sprintf(`[databases]
%s = %s

[pgbouncer]
listen_port = 6432
unix_socket_dir = %s
auth_type = any
pool_mode = transaction
default_pool_size = %d
max_client_conn = 100
log_connections = 0
log_disconnections = 0
`, database, target, dir, pgBouncerPoolSize)
}

// dbProxy forwards TCP connections to a database. It can cut every
// connection and refuse new ones until it is restored, and stall (freeze):
// take everything and forward nothing, as a network or a host that stops
// answering does.
type dbProxy struct {
	network, target string // the database's address
	addr            string // where the proxy listens
	schema          string // for newDBProxy, the schema its URL works in

	// stalled makes the proxy swallow everything in both directions.
	stalled atomic.Bool

	mu    sync.Mutex
	conns map[net.Conn]bool
	down  bool // cut and not restored: connections are closed as they come
}

// newDBProxy starts a proxy to the test database and returns it with a
// connection URL that goes through it to a fresh schema.
func newDBProxy(t *testing.T) (*dbProxy, string) {
	t.Helper()
	databaseURL, schema := newSchema(t)
	cfg, err := pq.NewConfig(databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	network, target := "tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
	if strings.HasPrefix(cfg.Host, "/") {
		network, target = "unix", fmt.Sprintf("%s/.s.PGSQL.%d", cfg.Host, cfg.Port)
	}
	p := newProxy(t, network, target)
	p.schema = schema
	host, port, _ := net.SplitHostPort(p.addr)
	return p, retarget(t, databaseURL, "host", host, "port", port)
}

// newProxy starts a proxy to target on a loopback port, cut when the test
// ends.
func newProxy(t *testing.T, network, target string) *dbProxy {
	t.Helper()
	p := &dbProxy{network: network, target: target, conns: map[net.Conn]bool{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	go func() {
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			if p.track(client) {
				go p.forward(client)
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		p.cut()
	})
	return p
}

// track registers c for cut to close, under the lock that cut takes, so no
// connection slips past a cut; if the proxy is down it closes c instead.
// It reports whether c is open.
func (p *dbProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		c.Close()
		return false
	}
	p.conns[c] = true
	return true
}

func (p *dbProxy) forward(client net.Conn) {
	server, err := net.Dial(p.network, p.target)
	if err != nil || !p.track(server) {
		client.Close()
		return
	}
	pipe := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if err != nil {
				break
			}
			if p.stalled.Load() {
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

// cut closes every proxied connection, and every new one until restore.
func (p *dbProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// restore forwards new connections again.
func (p *dbProxy) restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = false
}

// outcome is one create's answer, for matching against the table after.
type outcome struct {
	email      string
	status     int
	start, end time.Time
}

// createLoad sends creates of fresh addresses from several clients until it
// is stopped, at the latest when the test ends, and keeps every outcome.
type createLoad struct {
	mu       sync.Mutex
	outcomes []outcome
	stop     func() // stops the load and waits for its clients
}

// startCreateLoad starts clients that each send creates through do.
func startCreateLoad(t *testing.T, clients int, do func(client int, body string) response) *createLoad {
	l := &createLoad{}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	l.stop = sync.OnceFunc(func() {
		cancel()
		wg.Wait()
	})
	t.Cleanup(l.stop)
	for c := range clients {
		wg.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				email := fmt.Sprintf("load%d-%d@example.com", c, i)
				start := time.Now()
				r := do(c, userBody("Load", "Test", email, "passw0rd-1"))
				if r.status == http.StatusServiceUnavailable && r.header.Get("Retry-After") == "" {
					t.Errorf("%s: 503 without Retry-After", r.what)
				}
				l.mu.Lock()
				l.outcomes = append(l.outcomes, outcome{email, r.status, start, time.Now()})
				l.mu.Unlock()
			}
		})
	}
	return l
}

// count returns how many creates begun at since or later were answered
// status.
func (l *createLoad) count(status int, since time.Time) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, o := range l.outcomes {
		if o.status == status && !o.start.Before(since) {
			n++
		}
	}
	return n
}

// check matches the outcomes of the stopped load against table in db. Every
// 201 must be stored, and every 503 must have left nothing, unless the
// create was in flight during the fault, from faultStart to faultEnd: its
// commit may have gone through with its answer lost with the connection,
// and no service can know. Any other answer fails the test. check logs
// what the creates came to, and returns the slowest answer's time.
func (l *createLoad) check(t *testing.T, db *sql.DB, table string, faultStart, faultEnd time.Time) (slowest time.Duration) {
	t.Helper()
	var emails []string
	if err := db.QueryRow(`SELECT coalesce(array_agg(email), '{}') FROM ` + table).Scan(pq.Array(&emails)); err != nil {
		t.Fatalf("read the stored emails: %v", err)
	}
	var created, lost, unavailable, inFlight, inFlightStored int
	for _, o := range l.outcomes {
		slowest = max(slowest, o.end.Sub(o.start))
		switch o.status {
		case http.StatusCreated:
			created++
			if !slices.Contains(emails, o.email) {
				lost++
				t.Errorf("create of %s answered 201 at %v after the fault began, but is not stored", o.email, o.end.Sub(faultStart))
			}
		case http.StatusServiceUnavailable:
			unavailable++
			if o.start.Before(faultEnd) && o.end.After(faultStart) {
				inFlight++
				if slices.Contains(emails, o.email) {
					inFlightStored++
				}
			} else if slices.Contains(emails, o.email) {
				t.Errorf("create of %s answered 503 but is stored", o.email)
			}
		default:
			t.Errorf("create of %s answered %d, want 201 or 503", o.email, o.status)
		}
	}
	t.Logf("%d creates: %d answered 201 (%d of them not stored), %d answered 503 (%d in flight at the fault, %d of those stored); slowest answer %v",
		len(l.outcomes), created, lost, unavailable, inFlight, inFlightStored, slowest.Round(time.Millisecond))
	return slowest
}

func TestDatabaseCutUnderLoad(t *testing.T) {
	t.Parallel()
	proxy, databaseURL := newDBProxy(t)
	e := newTestEnv(t, withStore(newStoreWith(t, databaseURL, testPool, time.Second)))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	load := startCreateLoad(t, 4, func(_ int, body string) response { return e.do("POST", "/users", body) })
	begin := time.Now()
	waitUntil(t, "20 creates before the cut", func() bool { return load.count(http.StatusCreated, begin) >= 20 })

	cutAt := time.Now()
	proxy.cut()
	cutDone := time.Now()
	// While it is down, every route says so.
	for _, rq := range everyUsersRoute(u.ID) {
		mustRetryLater(t, e.do(rq.method, rq.path, rq.body))
	}
	mustRetryLater(t, e.do("GET", "/healthz", ""))
	waitUntil(t, "4 creates answered 503 while the database is cut off", func() bool {
		return load.count(http.StatusServiceUnavailable, cutDone) >= 4
	})

	// It recovers by itself.
	proxy.restore()
	restored := time.Now()
	waitUntil(t, "20 creates after the database is back", func() bool { return load.count(http.StatusCreated, restored) >= 20 })
	load.stop()
	if r := e.do("GET", "/healthz", ""); r.status != http.StatusOK {
		t.Errorf("%s after the database came back, want 200", r)
	}
	mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK)
	load.check(t, adminDB, proxy.schema+".users", cutAt, cutDone)
}

func TestDatabaseStallIsBounded(t *testing.T) {
	t.Parallel()
	proxy, databaseURL := newDBProxy(t)
	e := newTestEnv(t, withStore(newStoreWith(t, databaseURL, testPool, 300*time.Millisecond)))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")

	proxy.stalled.Store(true)
	for _, rq := range everyUsersRoute(u.ID) {
		start := time.Now()
		r := e.do(rq.method, rq.path, rq.body)
		mustRetryLater(t, r)
		// The bound is 300 ms: a hundred times that is no timing on a busy
		// machine, it is a hang.
		if d := time.Since(start); d > 30*time.Second {
			t.Errorf("%s answered 503 only after %v", r.what, d)
		}
	}
	mustRetryLater(t, e.do("GET", "/healthz", ""))
	// Once the network answers again, the service recovers by itself.
	proxy.stalled.Store(false)
	waitUntil(t, "/healthz answers 200 after the stall", func() bool { return e.do("GET", "/healthz", "").status == http.StatusOK })
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
		t.Errorf("after the stall: %+v, want %+v", got, u)
	}
}

func TestDatabaseGoneAtStart(t *testing.T) {
	t.Parallel()
	// A database that takes connections and never answers: only a connect
	// timeout gets the service out.
	proxy, databaseURL := newDBProxy(t)
	proxy.stalled.Store(true)
	env := map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0"}
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- run(t.Context(), nil, func(k string) string { return env[k] }, io.Discard, io.Discard) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "DATABASE_URL") || !strings.Contains(err.Error(), proxy.addr) {
			t.Errorf("run = %v, want an error naming DATABASE_URL and %s", err, proxy.addr)
		}
		t.Logf("gave up after %v: %v", time.Since(start).Round(time.Millisecond), err)
	case <-time.After(30 * time.Second):
		t.Fatal("run still waiting for a silent database after 30s")
	}
}

// TestFrozenHostIsPassedOver lists two hosts, both the test database, the
// first through a proxy that freezes: it takes connections and never
// answers. The service starts, and once one request has waited out the
// silence bound, the next are served by the second host, not by the next
// pooled connection to the frozen one.
func TestFrozenHostIsPassedOver(t *testing.T) {
	t.Parallel()
	proxy, databaseURL := newDBProxy(t)
	cfg, err := pq.NewConfig(testDatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(proxy.addr)
	databaseURL = retarget(t, databaseURL, "host", host+","+cfg.Host, "port", port+","+strconv.Itoa(int(cfg.Port)), "connect_timeout", "1")

	proxy.stalled.Store(true)
	s := startRun(t, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0"})
	if r := s.do("GET", "/healthz", ""); r.status != http.StatusOK {
		t.Errorf("%s with the first host frozen, want 200", r)
	}
	s.stop(t)

	proxy.stalled.Store(false)
	st := newStoreWith(t, databaseURL, testPool, 3*time.Second)
	var conns []*sql.Conn // fill the pool with connections to the first host
	for range testPool.maxOpen {
		c, err := st.db.Conn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	for _, c := range conns {
		c.Close()
	}
	e := newTestEnv(t, withStore(st))
	proxy.stalled.Store(true)
	mustRetryLater(t, e.do("GET", "/users/1", ""))
	for range 3 {
		if r := e.do("GET", "/users/1", ""); r.status != http.StatusNotFound {
			t.Errorf("%s after a connection to the frozen host fell silent, want 404 from the other host", r)
		}
	}
}

// retarget returns databaseURL as key=value settings, with the settings
// kv (key, value, ...) in place of its own.
func retarget(t *testing.T, databaseURL string, kv ...string) string {
	t.Helper()
	dsn, err := parseDatabaseURL(databaseURL)
	if err == nil && strings.HasPrefix(dsn, "postgres://") {
		//lint:ignore SA1019 it turns a URL into settings, which later ones override
		dsn, err = pq.ParseURL(dsn)
	}
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(kv); i += 2 {
		dsn = withParam(dsn, kv[i], kv[i+1])
	}
	return dsn
}

// newDatabase creates an empty database that is dropped when the test ends,
// for tests that change settings of a whole database or cannot use a
// schema. It returns a connection URL for it and its name.
func newDatabase(t *testing.T) (databaseURL, name string) {
	t.Helper()
	name = "test_" + strings.ToLower(rand.Text())
	if _, err := adminDB.Exec(`CREATE DATABASE ` + name); err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		if _, err := adminDB.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	return retarget(t, testDatabaseURL(), "dbname", name), name
}

// killConnections terminates the database connections whose
// application_name is name, and waits until they are gone.
func killConnections(t *testing.T, name string) {
	t.Helper()
	if _, err := adminDB.Exec(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1`, name); err != nil {
		t.Fatal(err)
	}
	waitNoConnections(t, name)
}

// mustRetryLater checks that r is 503 Service unavailable with a
// Retry-After of a whole number of seconds, at least 1.
func mustRetryLater(t *testing.T, r response) {
	t.Helper()
	mustError(t, r, http.StatusServiceUnavailable, "Service unavailable")
	if n, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || n < 1 {
		t.Errorf("%s: Retry-After = %q, want a number of seconds", r.what, r.header.Get("Retry-After"))
	}
}

func TestNotNowDatabaseStatesAnswer503(t *testing.T) {
	t.Parallel()
	databaseURL, name := newDatabase(t)
	e := newTestEnv(t, withStore(newStoreAt(t, withParam(databaseURL, "application_name", name))))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	admin := func(sql string) {
		t.Helper()
		if _, err := adminDB.Exec(sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}

	// A read-only database (a standby, a demoted primary): writes are
	// refused with 503 and change nothing; reads go on.
	admin(`ALTER DATABASE ` + name + ` SET default_transaction_read_only = on`)
	killConnections(t, name)
	for _, rq := range everyUsersRoute(u.ID) {
		if r := e.do(rq.method, rq.path, rq.body); rq.method != "GET" {
			mustRetryLater(t, r)
		} else if r.status != http.StatusOK {
			t.Errorf("%s on a read-only database, want 200", r)
		}
	}
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
		t.Errorf("after refused writes: %+v, want %+v", got, u)
	}
	admin(`ALTER DATABASE ` + name + ` RESET default_transaction_read_only`)

	// A database that takes no connections, or is not there by that name:
	// every route says 503, and so does /healthz.
	for _, state := range []struct{ off, on string }{
		{`ALTER DATABASE ` + name + ` ALLOW_CONNECTIONS false`, `ALTER DATABASE ` + name + ` ALLOW_CONNECTIONS true`},
		{`ALTER DATABASE ` + name + ` RENAME TO ` + name + `_away`, `ALTER DATABASE ` + name + `_away RENAME TO ` + name},
	} {
		killConnections(t, name)
		admin(state.off)
		for _, rq := range everyUsersRoute(u.ID) {
			mustRetryLater(t, e.do(rq.method, rq.path, rq.body))
		}
		mustRetryLater(t, e.do("GET", "/healthz", ""))
		admin(state.on)
	}
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
		t.Errorf("after the outages: %+v, want %+v", got, u)
	}
	e.createUser(t, "Bob", "Ray", "bob@example.com", "passw0rd-1")
}

func TestTimedOutWritesAreNotAppliedLater(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	const users, writes = 6, 24
	pool := poolConfig{maxOpen: writes, maxIdle: writes, maxIdleTime: time.Minute}
	e := newTestEnv(t, withStore(newStoreWith(t, withParam(databaseURL, "application_name", schema), pool, time.Second)))
	ids := make([]int64, users)
	for i := range ids {
		ids[i] = e.createUser(t, "Ann", "Lee", fmt.Sprintf("ann%d@example.com", i), "passw0rd-1").ID
	}
	// A warm pool: each write finds a connection ready.
	concurrently(writes, func(i int) response { return e.do("GET", fmt.Sprintf("/users/%d", ids[i%users]), "") })

	// Another session holds the rows while the writes wait for them, longer
	// than the service's bound.
	lock, err := adminDB.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Rollback()
	if _, err := lock.Exec(`SELECT 1 FROM `+schema+`.users WHERE id = ANY($1) FOR UPDATE`, pq.Array(ids)); err != nil {
		t.Fatal(err)
	}
	rs := concurrently(writes, func(i int) response {
		path := fmt.Sprintf("/users/%d", ids[i%users])
		switch i % 3 {
		case 0:
			return e.do("PUT", path, `{"first_name":"Changed"}`)
		case 1:
			return e.do("PUT", path, `{"password":"changed-password"}`)
		default:
			return e.do("DELETE", path, "")
		}
	})
	for _, r := range rs {
		mustRetryLater(t, r)
	}
	// PostgreSQL itself gave up on them, before the service did.
	if !strings.Contains(e.logs.String(), "canceling statement due to lock timeout") {
		t.Errorf("no write was stopped by the server's lock_timeout; log:\n%s", e.logs)
	}
	// The table as the writes found it, read past the lock: a digest of
	// every row, which any update or delete changes.
	table := `SELECT count(*), md5(string_agg(id || first_name || password, ',' ORDER BY id)) FROM ` + schema + `.users`
	var n int
	var before, after string
	if err := adminDB.QueryRow(table).Scan(&n, &before); err != nil || n != users {
		t.Fatalf("%d users (%v), want %d", n, err, users)
	}
	lock.Rollback()

	// Whatever the server still had queued for the service runs now: wait
	// until none of its statements is running.
	waitUntil(t, "no statement of the service running after the rows were released", func() bool {
		var running int
		err := adminDB.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state <> 'idle'`, schema).Scan(&running)
		return err == nil && running == 0
	})
	if err := adminDB.QueryRow(table).Scan(&n, &after); err != nil || n != users || after != before {
		t.Errorf("after %d writes answered 503: %d of %d users left (%v), rows changed: %v; want nothing changed", writes, n, users, err, after != before)
	}
}

func TestPoolRecoversFromKilledConnections(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	e := newTestEnv(t, withStore(newStoreAt(t, withParam(databaseURL, "application_name", schema))))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	// The database is fine: neither /healthz nor a write may fail for a
	// dead pooled connection.
	for _, rq := range []struct{ method, path, body string }{
		{"GET", "/healthz", ""},
		{"PUT", fmt.Sprintf("/users/%d", u.ID), `{"first_name":"Changed"}`},
	} {
		// Fill the pool with connections, then kill every one.
		concurrently(testPool.maxOpen, func(int) response { return e.do("GET", "/healthz", "") })
		killConnections(t, schema)
		for i := range testPool.maxOpen {
			if r := e.do(rq.method, rq.path, rq.body); r.status != http.StatusOK {
				t.Fatalf("call %d after the pool's connections were killed: %s, want 200; log:\n%s", i, r, e.logs)
			}
		}
	}
}

func TestBoundsAreOrdered(t *testing.T) {
	t.Parallel()
	// The server gives up first and says so, then the call's context ends
	// (lib/pq asks the server to cancel), and only then is a silent
	// connection cut, which asks nothing.
	for _, call := range []time.Duration{300 * time.Millisecond, time.Second, queryTimeout} {
		b := newBounds(call)
		if !(0 < b.lock && b.lock < b.statement && b.statement < b.call && b.call == call && b.call < b.silence) {
			t.Errorf("newBounds(%v) = %+v, want 0 < lock < statement < call < silence", call, b)
		}
		if b.silence > call+time.Second {
			t.Errorf("newBounds(%v): silence %v, want at most a second past the call's bound", call, b.silence)
		}
	}
}

// serverProgram returns the path of the server program name, looked for in
// dirs, then on PATH. If it is missing the test fails in CI, where it must
// run, and is skipped elsewhere.
func serverProgram(t *testing.T, name, pkg string, dirs ...string) string {
	t.Helper()
	for _, dir := range dirs {
		if _, err := os.Stat(filepath.Join(dir, name)); dir != "" && err == nil {
			return filepath.Join(dir, name)
		}
	}
	if path, err := exec.LookPath(name); err == nil {
		return path
	}
	msg := fmt.Sprintf("this test needs %s: install %s (on Debian, apt-get install it)", name, pkg)
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// serverUser returns the postgres OS user's credential if this is root, and
// nil otherwise: PostgreSQL and PgBouncer refuse to run as root.
func serverUser(t *testing.T) *syscall.Credential {
	t.Helper()
	if os.Geteuid() != 0 {
		return nil
	}
	u, err := osuser.Lookup("postgres")
	if err != nil {
		t.Fatalf("running as root, and no postgres OS user to run servers as: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
}

// serverDir returns a temporary directory, removed when the test ends, that
// servers run by serverCommand may write in.
func serverDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if cred := serverUser(t); cred != nil {
		for _, err := range []error{os.Chmod(filepath.Dir(dir), 0o711), os.Chown(dir, int(cred.Uid), int(cred.Gid))} {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	return dir
}

// serverCommand returns a command that runs a server program in dir, as
// serverUser, and is stopped if the test process dies.
func serverCommand(t *testing.T, dir, path string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(path, args...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: serverUser(t), Pdeathsig: syscall.SIGKILL}
	return cmd
}

// pgServers runs PostgreSQL servers of the test's own, from the server
// programs on this machine, in a temporary directory: stopped and removed
// when the test ends, whatever happened.
type pgServers struct {
	t        *testing.T
	bin, dir string
}

func newPGServers(t *testing.T) *pgServers {
	t.Helper()
	bin, _ := exec.Command("pg_config", "--bindir").Output()
	return &pgServers{t: t, bin: strings.TrimSpace(string(bin)), dir: serverDir(t)}
}

// command returns the command that runs a server program with args.
func (s *pgServers) command(name string, args ...string) *exec.Cmd {
	s.t.Helper()
	return serverCommand(s.t, s.dir, serverProgram(s.t, name, "PostgreSQL's server programs (postgresql)", s.bin), args...)
}

// run runs a server program to its end, and fails the test if it fails.
func (s *pgServers) run(name string, args ...string) {
	s.t.Helper()
	if out, err := s.command(name, args...).CombinedOutput(); err != nil {
		s.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// start starts the server of data directory name on port, with more
// options for it, waits until it takes connections, and stops it when the
// test ends.
func (s *pgServers) start(name, port, options string) {
	s.t.Helper()
	opts := fmt.Sprintf("-p %s -k %s -c listen_addresses=127.0.0.1 -c fsync=off %s", port, s.dir, options)
	s.t.Cleanup(func() { s.command("pg_ctl", "-D", name, "-m", "immediate", "stop").Run() })
	if out, err := s.command("pg_ctl", "-D", name, "-l", name+".log", "-o", opts, "-w", "-t", "60", "start").CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(s.dir, name+".log"))
		s.t.Fatalf("pg_ctl start %s: %v\n%s%s", name, err, out, log)
	}
}

// openDB opens a database/sql pool on dsn, closed when the test ends.
func openDB(t *testing.T, dsn string) *sql.DB {
	t.Helper()
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// TestFailoverDrill fails a primary under creates, killed or frozen (it
// takes connections and never answers), and promotes its standby.
func TestFailoverDrill(t *testing.T) {
	t.Parallel()
	for _, fault := range []string{"killed", "frozen"} {
		t.Run(fault, func(t *testing.T) {
			t.Parallel()
			failoverDrill(t, fault == "frozen")
		})
	}
}

func failoverDrill(t *testing.T, freeze bool) {
	pg := newPGServers(t)
	_, primaryPort, _ := net.SplitHostPort(closedAddr(t))
	_, standbyPort, _ := net.SplitHostPort(closedAddr(t))

	// A primary that waits for its standby on every commit. Only the
	// primary gets synchronous_standby_names, on its command line: the
	// standby, promoted, would otherwise wait for a standby of its own.
	pg.run("initdb", "-D", "primary", "-A", "trust", "-U", "postgres", "-N")
	pg.start("primary", primaryPort, "-c synchronous_standby_names=standby")
	pg.run("pg_basebackup", "-d", "host=127.0.0.1 port="+primaryPort+" user=postgres application_name=standby",
		"-D", "standby", "-R", "-X", "stream", "-c", "fast")
	pg.start("standby", standbyPort, "")
	primaryDB := openDB(t, "host=127.0.0.1 port="+primaryPort+" user=postgres dbname=postgres sslmode=disable")
	waitUntil(t, "the standby is synchronous", func() bool {
		var state string
		primaryDB.QueryRow(`SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'`).Scan(&state)
		return state == "sync"
	})
	// The service reaches the primary through a proxy that can freeze.
	proxy := newProxy(t, "tcp", "127.0.0.1:"+primaryPort)

	// The service, on both, in the form operators copy from PostgreSQL's
	// documentation, with its production bound; and a second copy told
	// any host will do, whose writes reach the standby while it is
	// read-only.
	var envs []*testEnv
	for _, attrs := range []string{"&target_session_attrs=read-write", ""} {
		dsn, err := parseDatabaseURL("postgres://postgres@" + proxy.addr + ",127.0.0.1:" + standbyPort + "/postgres?sslmode=disable" + attrs)
		if err != nil {
			t.Fatal(err)
		}
		envs = append(envs, newTestEnv(t, withStore(newStoreWith(t, dsn, testPool, queryTimeout))))
	}

	load := startCreateLoad(t, 4, func(client int, body string) response { return envs[client%2].do("POST", "/users", body) })
	begin := time.Now()
	waitUntil(t, "20 creates on the primary", func() bool { return load.count(http.StatusCreated, begin) >= 20 })

	faultStart := time.Now()
	if freeze {
		proxy.stalled.Store(true)
	} else {
		pg.run("pg_ctl", "-D", "primary", "-m", "immediate", "stop")
	}
	faultEnd := time.Now()
	waitUntil(t, "503s while there is no primary", func() bool { return load.count(http.StatusServiceUnavailable, faultEnd) >= 8 })
	// The standby takes over.
	promoted := time.Now()
	pg.run("pg_ctl", "-D", "standby", "-w", "-t", "60", "promote")
	waitUntil(t, "20 creates on the new primary", func() bool { return load.count(http.StatusCreated, promoted) >= 20 })
	load.stop()

	// Every 201 is on the new primary; a create answered 503 left nothing, unless it was in flight
	// when the primary failed: its commit may have reached the standby.
	newPrimary := openDB(t, "host=127.0.0.1 port="+standbyPort+" user=postgres dbname=postgres sslmode=disable")
	slowest := load.check(t, newPrimary, "users", faultStart, faultEnd)
	var firstAfter time.Duration
	for _, o := range load.outcomes {
		if d := o.end.Sub(promoted); o.status == http.StatusCreated && !o.start.Before(promoted) && (firstAfter == 0 || d < firstAfter) {
			firstAfter = d
		}
	}
	if !strings.Contains(envs[1].logs.String(), "read-only transaction") {
		t.Errorf("no create reached the read-only standby; the second service's log:\n%s", envs[1].logs)
	}
	// Three times the silence bound is not a timing, it is a hang.
	if bound := newBounds(queryTimeout).silence; slowest > 3*bound {
		t.Errorf("slowest answer %v, want well within the bound %v", slowest, bound)
	}
	t.Logf("first 201 %v after the promotion began, %v after the fault", firstAfter.Round(time.Millisecond), (promoted.Sub(faultEnd) + firstAfter).Round(time.Millisecond))
}

// A write runs at READ COMMITTED whatever the database's default: at a
// stricter level, an update that waited for another one's lock fails with a
// serialization error instead of applying to the row as it now is.
func TestWritesAreReadCommitted(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	dsn := withParam(withParam(databaseURL, "default_transaction_isolation", "serializable"), "application_name", schema)
	e := newTestEnv(t, withStore(newStoreAt(t, dsn)))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	other, err := adminDB.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer other.Rollback()
	if _, err := other.Exec(`UPDATE `+schema+`.users SET last_name = 'Ray' WHERE id = $1`, u.ID); err != nil {
		t.Fatal(err)
	}
	done := make(chan response, 1)
	go func() { done <- e.do("PUT", fmt.Sprintf("/users/%d", u.ID), `{"first_name":"Bo"}`) }()
	waitUntil(t, "the PUT to wait for the other update's lock", func() bool {
		var waiting int
		err := adminDB.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'`, schema).Scan(&waiting)
		return err == nil && waiting == 1
	})
	if err := other.Commit(); err != nil {
		t.Fatal(err)
	}
	got := mustUser(t, <-done, http.StatusOK)
	if got.FirstName != "Bo" || got.LastName != "Ray" {
		t.Errorf("PUT after a concurrent update: %+v, want first_name Bo and the other update's last_name Ray", got)
	}
}

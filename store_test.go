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
	err := errors.Join(concurrently(4, func(int) error {
		st, err := openStore(context.Background(), databaseURL, testPool, 5*time.Second)
		if err == nil {
			st.Close()
		}
		return err
	})...)
	if err != nil {
		t.Errorf("openStore by 4 replicas booting at once: %v", err)
	}
}

// TestOldDatabaseIsUpgraded boots on an older schema's tables: users get a
// version (ETags work), addresses NFC unless another account has that
// spelling (then both keep theirs), and the old throttle table goes.
func TestOldDatabaseIsUpgraded(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	old, err := os.ReadFile("testdata/schema-before-version.sql")
	if err != nil {
		t.Fatal(err)
	}
	db := openDB(t, databaseURL)
	if _, err := db.Exec(string(old) + `; INSERT INTO auth_failures VALUES ('ann@example.com', 9, now())`); err != nil {
		t.Fatalf("the old schema: %v", err)
	}
	stored := []string{"ann@example.com", "ju\u0308rgen@example.com", "zöe@example.com", "zo\u0308e@example.com", "a\u0302\u0323@example.com", "a\u0323\u0302@example.com"}
	want := []string{"ann@example.com", "jürgen@example.com", "zöe@example.com", "zo\u0308e@example.com", "ậ@example.com", "a\u0323\u0302@example.com"}
	if _, err := db.Exec(`INSERT INTO users (first_name, last_name, email, password, salt)
		SELECT 'Ann', 'Lee', email, 'x', 'y' FROM unnest($1::text[]) WITH ORDINALITY AS a(email, i) ORDER BY i`, pq.Array(stored)); err != nil {
		t.Fatal(err)
	}
	st := newStoreAt(t, databaseURL)
	users, err := st.Users(context.Background(), 0, 10)
	for i := range want {
		if err != nil || len(users) != len(want) || users[i].Email != want[i] {
			t.Fatalf("after a boot: %v (%v); address %d stored as %+q, want %+q", users, err, i, stored[i], want[i])
		}
	}
	e := newTestEnv(t, withStore(st))
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
	var gone bool
	if err := adminDB.QueryRow(`SELECT to_regclass($1) IS NULL`, schema+".auth_failures").Scan(&gone); err != nil || !gone {
		t.Errorf("auth_failures still there after the upgrade (%v)", err)
	}
}

func TestStorePassesTheContext(t *testing.T) {
	t.Parallel()
	st := newTestStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, usersErr := st.Users(ctx, 0, 10)
	_, userErr := st.User(ctx, 1)
	_, createErr := st.CreateUser(ctx, newUser{"Ann", "Lee", "ann@example.com", passwordHash{"$2a$04$" + strings.Repeat("x", 53), "$2a$04$" + strings.Repeat("x", 22)}})
	for call, err := range map[string]error{"Users": usersErr, "User": userErr, "CreateUser": createErr} {
		if !errors.Is(err, context.Canceled) {
			t.Errorf("%s with a cancelled context: err = %v, want context.Canceled", call, err)
		}
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

// tally counts rs by status, failing on a status not in want, or a body
// without the detail want gives for it ("" for none).
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

// concurrentWrites are races that the store must settle, on a table that
// may hold other users.
var concurrentWrites = []struct {
	name string
	run  func(t *testing.T, e *testEnv, round int)
}{
	{"creates of one email: exactly one wins", func(t *testing.T, e *testEnv, round int) {
		email := fmt.Sprintf("race%d@example.com", round)
		spellings := []string{email, strings.ToUpper(email)} // one address
		rs := concurrently(30, func(i int) response {
			return e.do("POST", "/users", userBody("Ann", "Lee", spellings[i%2], "passw0rd-1"))
		})
		if n := tally(t, rs, map[int]string{201: "", 400: "Email already registered"}); n[201] != 1 {
			t.Errorf("round %d: %d of 30 creates of one email succeeded, want 1", round, n[201])
		}
		if users := mustList(t, e.do("GET", "/users?email="+email, "")); len(users) != 1 {
			t.Errorf("round %d: %d users with %s, want 1", round, len(users), email)
		}
	}},
	{"updates to one email: exactly one wins", func(t *testing.T, e *testEnv, round int) {
		ids := make([]int64, 20)
		for i := range ids {
			ids[i] = e.createUser(t, "User", "Racer", fmt.Sprintf("taker%d-%d@example.com", round, i), "passw0rd-1").ID
		}
		email := fmt.Sprintf("wanted%d@example.com", round)
		rs := concurrently(len(ids), func(i int) response {
			return e.do("PUT", fmt.Sprintf("/users/%d", ids[i]), `{"email":"`+strings.ToUpper(email)+`"}`)
		})
		n := tally(t, rs, map[int]string{200: "", 400: "Email already registered"})
		if holders := mustList(t, e.do("GET", "/users?email="+email, "")); n[200] != 1 || len(holders) != 1 {
			t.Errorf("round %d: %d updates to one email succeeded and %d users hold it; want one, the same", round, n[200], len(holders))
		}
	}},
	{"deletes, updates and reads of one user: one delete wins", func(t *testing.T, e *testEnv, round int) {
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
	}},
	{"updates with the same If-Match: exactly one wins", func(t *testing.T, e *testEnv, round int) {
		u := e.createUser(t, "Ann", "Lee", fmt.Sprintf("matched%d@example.com", round), "passw0rd-1")
		rs := concurrently(2, func(i int) response {
			return e.do("PUT", fmt.Sprintf("/users/%d", u.ID), fmt.Sprintf(`{"last_name":"Writer%d"}`, i), `If-Match: "1"`)
		})
		if n := tally(t, rs, map[int]string{200: "", 412: "Precondition failed: the user has changed"}); n[200] != 1 {
			t.Errorf("round %d: %d of 2 updates with one If-Match succeeded, want 1", round, n[200])
		}
	}},
	{"updates of different fields: none is lost", func(t *testing.T, e *testEnv, round int) {
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
	}},
}

// TestConcurrentWrites runs the races directly and through PgBouncer with a
// small transaction pool, where they settle alike, and lists and pages read
// the table whole.
func TestConcurrentWrites(t *testing.T) {
	t.Parallel()
	for _, via := range []string{"directly", "through PgBouncer"} {
		t.Run(via, func(t *testing.T) {
			t.Parallel()
			st := newTestStore(t)
			if via != "directly" {
				st = newStoreWith(t, startPgBouncer(t), poolConfig{maxOpen: 16, maxIdle: 16, maxIdleTime: time.Minute, transactionPooler: true}, 30*time.Second)
			}
			e := newTestEnv(t, withStore(st))
			for _, c := range concurrentWrites {
				t.Run(c.name, func(t *testing.T) {
					for round := range 10 {
						c.run(t, e, round)
					}
				})
			}
			// First pages of different sizes at once, then the pages after them.
			whole := mustList(t, e.do("GET", "/users", ""))
			link := regexp.MustCompile(`^<([^>]+)>; rel="next"$`)
			for i, r := range concurrently(16, func(i int) response { return e.do("GET", fmt.Sprintf("/users?limit=%d", 2+i), "") }) {
				got := mustList(t, r)
				for m := link.FindStringSubmatch(r.header.Get("Link")); m != nil; m = link.FindStringSubmatch(r.header.Get("Link")) {
					r = e.do("GET", m[1], "")
					got = append(got, mustList(t, r)...)
				}
				if n := countUsers(t, st); len(got) != n || !slices.Equal(got, whole) {
					t.Errorf("pages of %d and the pages after them: %d users, want the %d stored, as GET /users read them", 2+i, len(got), n)
				}
			}
			// The premise: the service's connections outnumbered PgBouncer's.
			if open := st.db.Stats().OpenConnections; via != "directly" && open <= pgBouncerPoolSize {
				t.Errorf("the service opened %d connections to PgBouncer, want more than its pool of %d", open, pgBouncerPoolSize)
			}
		})
	}
}

// pgBouncerPoolSize is PgBouncer's server connections: far fewer than the service's.
const pgBouncerPoolSize = 2

// startPgBouncer starts PgBouncer in transaction pooling mode on a socket
// of its own, in front of a database of its own (it refuses newSchema's
// search_path), and returns the URL through it. Without
// ignore_startup_parameters, a parameter it refuses fails the test.
func startPgBouncer(t *testing.T) string {
	t.Helper()
	binary := serverProgram(t, "pgbouncer", "the pgbouncer package", "/usr/sbin")
	databaseURL, database := newDatabase(t)
	server, err := pq.NewConfig(databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	quote := func(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
	target := fmt.Sprintf("host=%s port=%d dbname=%s user=%s", quote(server.Host), server.Port, database, quote(server.User))
	if server.Password != "" {
		target += " password=" + quote(server.Password)
	}
	srv := newServerDir(t)
	conf := filepath.Join(srv.dir, "pgbouncer.ini")
	if err := os.WriteFile(conf, fmt.Appendf(nil, `[databases]
%s = %s
[pgbouncer]
listen_port = 6432
unix_socket_dir = %s
auth_type = any
pool_mode = transaction
default_pool_size = %d
`, database, target, srv.dir, pgBouncerPoolSize), 0o644); err != nil {
		t.Fatal(err)
	}
	out := &syncBuffer{}
	cmd := srv.command(binary, conf)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pgbouncer: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("PgBouncer's output:\n%s", out)
		}
	})
	bouncerURL := fmt.Sprintf("host=%s port=6432 user=%s dbname=%s sslmode=disable connect_timeout=5", srv.dir, server.User, database)
	db := openDB(t, bouncerURL)
	waitUntil(t, "PgBouncer answers", func() bool { return db.Ping() == nil })
	return bouncerURL
}

// dbProxy forwards TCP connections to a database, and can stall: take
// everything and forward nothing, as a network or a frozen host does.
type dbProxy struct {
	addr    string // where the proxy listens
	stalled atomic.Bool
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
	network, target := "tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
	if strings.HasPrefix(cfg.Host, "/") {
		network, target = "unix", fmt.Sprintf("%s/.s.PGSQL.%d", cfg.Host, cfg.Port)
	}
	p := newProxy(t, network, target)
	host, port, _ := net.SplitHostPort(p.addr)
	return p, retarget(t, databaseURL, "host", host, "port", port)
}

// newProxy starts a proxy to target on a loopback port.
func newProxy(t *testing.T, network, target string) *dbProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	p := &dbProxy{addr: ln.Addr().String()}
	go func() {
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			if server, err := net.Dial(network, target); err != nil {
				client.Close()
			} else {
				go p.pipe(server, client)
				go p.pipe(client, server)
			}
		}
	}()
	return p
}

// pipe copies src to dst, dropping what it reads while stalled, then closes both.
func (p *dbProxy) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		if p.stalled.Load() {
			continue // the network eats it
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			return
		}
	}
}

// outcome is one create's answer, for matching against the table after.
type outcome struct {
	email      string
	status     int
	start, end time.Time
}

// createLoad sends creates of fresh addresses from 4 clients until it is
// stopped, at the latest when the test ends, and keeps every outcome.
type createLoad struct {
	mu       sync.Mutex
	outcomes []outcome
	stop     func() // stops the load and waits for its clients
}

func startCreateLoad(t *testing.T, e *testEnv) *createLoad {
	l := &createLoad{}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	l.stop = sync.OnceFunc(func() { cancel(); wg.Wait() })
	t.Cleanup(l.stop)
	for c := range 4 {
		wg.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				email, start := fmt.Sprintf("load%d-%d@example.com", c, i), time.Now()
				r := e.do("POST", "/users", userBody("Load", "Test", email, "passw0rd-1"))
				l.mu.Lock()
				l.outcomes = append(l.outcomes, outcome{email, r.status, start, time.Now()})
				l.mu.Unlock()
			}
		})
	}
	return l
}

// waitFor waits until n creates begun since then were answered status.
func (l *createLoad) waitFor(t *testing.T, n, status int, since time.Time) {
	t.Helper()
	waitUntil(t, fmt.Sprintf("%d creates answered %d", n, status), func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		count := 0
		for _, o := range l.outcomes {
			if o.status == status && !o.start.Before(since) {
				count++
			}
		}
		return count >= n
	})
}

// check matches the stopped load against the users in db: every 201 stored,
// every 503 not, unless in flight during the fault (its commit may have
// gone through, its answer lost). A hang fails the client's 30 s timeout.
func (l *createLoad) check(t *testing.T, db *sql.DB, faultStart, faultEnd time.Time) {
	t.Helper()
	var emails []string
	if err := db.QueryRow(`SELECT coalesce(array_agg(email), '{}') FROM users`).Scan(pq.Array(&emails)); err != nil {
		t.Fatalf("read the stored emails: %v", err)
	}
	for _, o := range l.outcomes {
		stored, inFlight := slices.Contains(emails, o.email), o.start.Before(faultEnd) && o.end.After(faultStart)
		switch {
		case o.status == http.StatusCreated && !stored:
			t.Errorf("create of %s answered 201 at %v after the fault began, but is not stored", o.email, o.end.Sub(faultStart))
		case o.status == http.StatusServiceUnavailable && stored && !inFlight:
			t.Errorf("create of %s answered 503 but is stored", o.email)
		case o.status != http.StatusCreated && o.status != http.StatusServiceUnavailable:
			t.Errorf("create of %s answered %d, want 201 or 503", o.email, o.status)
		}
	}
}

// TestFrozenHostIsPassedOver freezes a proxy to the database. Alone, the
// service answers 503 on every route (the bound is 300 ms) and recovers by
// itself, and a service starting gives up, naming it. Listed first, the
// service starts, and once one request waited out the silence bound, the
// next are served by the second host, not by the next pooled connection to
// the frozen one.
func TestFrozenHostIsPassedOver(t *testing.T) {
	t.Parallel()
	proxy, databaseURL := newDBProxy(t)
	e := newTestEnv(t, withStore(newStoreWith(t, databaseURL, testPool, 300*time.Millisecond)))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	path := fmt.Sprintf("/users/%d", u.ID)
	proxy.stalled.Store(true)
	mustAllRetryLater(t, e, u.ID)
	env := map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0"}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	err := run(ctx, nil, func(k string) string { return env[k] }, io.Discard)
	if ctx.Err() != nil || err == nil || !strings.Contains(err.Error(), "DATABASE_URL") || !strings.Contains(err.Error(), proxy.addr) {
		t.Errorf("run = %v (30 s passed: %v), want an error naming DATABASE_URL and %s, sooner", err, ctx.Err(), proxy.addr)
	}
	proxy.stalled.Store(false)
	waitUntil(t, "/healthz answers 200 after the stall", func() bool { return e.do("GET", "/healthz", "").status == http.StatusOK })
	if got := mustUser(t, e.do("GET", path, ""), http.StatusOK); got != u {
		t.Errorf("after the stall: %+v, want %+v", got, u)
	}

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
	proxy.stalled.Store(false) // fill the pool with connections to the first host
	e = newTestEnv(t, withStore(newStoreWith(t, databaseURL, testPool, 3*time.Second)))
	concurrently(testPool.maxOpen, func(int) response { return e.do("GET", "/healthz", "") })
	proxy.stalled.Store(true)
	mustRetryLater(t, e.do("GET", path, ""))
	for range 3 {
		if got := mustUser(t, e.do("GET", path, ""), http.StatusOK); got != u {
			t.Errorf("after a connection to the frozen host fell silent: %+v, want %+v from the other host", got, u)
		}
	}
}

// retarget returns databaseURL as key=value settings, kv's pairs in place of its own.
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

// newDatabase creates a database, dropped when the test ends, and returns its URL and name.
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

// admin runs a statement as the test database's administrator.
func admin(t *testing.T, statement string) {
	t.Helper()
	if _, err := adminDB.Exec(statement); err != nil {
		t.Fatalf("%s: %v", statement, err)
	}
}

// killConnections ends the connections of application_name name, and waits for them to go.
func killConnections(t *testing.T, name string) {
	t.Helper()
	admin(t, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '`+name+`'`)
	waitNoConnections(t, name)
}

// mustRetryLater checks that r is a 503 with a Retry-After of at least 1 s.
func mustRetryLater(t *testing.T, r response) {
	t.Helper()
	mustError(t, r, http.StatusServiceUnavailable, "Service unavailable")
	if n, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || n < 1 {
		t.Errorf("%s: Retry-After = %q, want a number of seconds", r.what, r.header.Get("Retry-After"))
	}
}

// mustAllRetryLater checks mustRetryLater on every route of e and /healthz.
func mustAllRetryLater(t *testing.T, e *testEnv, id int64) {
	t.Helper()
	for _, rq := range append(everyUsersRoute(id), struct{ method, path, body string }{"GET", "/healthz", ""}) {
		mustRetryLater(t, e.do(rq.method, rq.path, rq.body))
	}
}

// TestNotNowDatabaseStatesAnswer503: while the database is in a passing
// state the service answers 503, then recovers; killed pooled connections
// of a database that is fine fail nothing.
func TestNotNowDatabaseStatesAnswer503(t *testing.T) {
	t.Parallel()
	databaseURL, name := newDatabase(t)
	e := newTestEnv(t, withStore(newStoreAt(t, withParam(databaseURL, "application_name", name))))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	for _, rq := range []struct{ method, path, body string }{
		{"GET", "/healthz", ""},
		{"PUT", fmt.Sprintf("/users/%d", u.ID), `{"first_name":"Anna"}`},
	} {
		// Fill the pool with connections, then kill every one.
		concurrently(testPool.maxOpen, func(int) response { return e.do("GET", "/healthz", "") })
		killConnections(t, name)
		for i := range testPool.maxOpen {
			if r := e.do(rq.method, rq.path, rq.body); r.status != http.StatusOK {
				t.Fatalf("call %d after the pool's connections were killed: %s, want 200; log:\n%s", i, r, e.logs)
			}
		}
	}
	u = mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK)
	// A read-only database (a standby, a demoted primary) refuses writes and
	// serves reads; one that takes no connections, or is not there by that
	// name, answers 503 on every route and /healthz.
	for _, state := range []struct {
		on, off string
		reads   bool
	}{
		{`ALTER DATABASE ` + name + ` SET default_transaction_read_only = on`, `ALTER DATABASE ` + name + ` RESET default_transaction_read_only`, true},
		{`ALTER DATABASE ` + name + ` ALLOW_CONNECTIONS false`, `ALTER DATABASE ` + name + ` ALLOW_CONNECTIONS true`, false},
		{`ALTER DATABASE ` + name + ` RENAME TO ` + name + `_away`, `ALTER DATABASE ` + name + `_away RENAME TO ` + name, false},
	} {
		killConnections(t, name)
		admin(t, state.on)
		for _, rq := range append(everyUsersRoute(u.ID), struct{ method, path, body string }{"GET", "/healthz", ""}) {
			if r := e.do(rq.method, rq.path, rq.body); !state.reads || rq.method != "GET" {
				mustRetryLater(t, r)
			} else if r.status != http.StatusOK {
				t.Errorf("%s on a read-only database, want 200", r)
			}
		}
		admin(t, state.off)
	}
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
		t.Errorf("after the refused writes and the outages: %+v, want %+v", got, u)
	}
	e.createUser(t, "Bob", "Ray", "bob@example.com", "passw0rd-1")
}

// TestTimedOutWritesAreNotAppliedLater holds rows that writes wait for past
// the bound: nothing queued applies later. (TestWriteTransactions checks that
// PostgreSQL's own timeouts end such a write first.)
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
	lock, err := adminDB.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Rollback()
	if _, err := lock.Exec(`SELECT 1 FROM `+schema+`.users WHERE id = ANY($1) FOR UPDATE`, pq.Array(ids)); err != nil {
		t.Fatal(err)
	}
	bodies := []string{`{"first_name":"Changed"}`, `{"password":"changed-password"}`, ""}
	for _, r := range concurrently(writes, func(i int) response {
		path := fmt.Sprintf("/users/%d", ids[i%users])
		if bodies[i%3] == "" {
			return e.do("DELETE", path, "")
		}
		return e.do("PUT", path, bodies[i%3])
	}) {
		mustRetryLater(t, r)
	}
	// A digest of every row, read past the lock, which any write changes.
	digest := func() (d string) {
		t.Helper()
		if err := adminDB.QueryRow(`SELECT count(*) || md5(string_agg(id || first_name || password, ',' ORDER BY id)) FROM ` + schema + `.users`).Scan(&d); err != nil {
			t.Fatal(err)
		}
		return d
	}
	before := digest()
	lock.Rollback()
	// Whatever the server still had queued for the service runs now.
	waitUntil(t, "no statement of the service running after the rows were released", func() bool {
		var running int
		err := adminDB.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state <> 'idle'`, schema).Scan(&running)
		return err == nil && running == 0
	})
	if after := digest(); after != before {
		t.Errorf("after %d writes answered 503: rows %s, want them as they were, %s", writes, after, before)
	}
}

// serverProgram returns the path of a program in dir or on PATH. If it is
// missing the test fails in CI, where it must run, and is skipped elsewhere.
func serverProgram(t *testing.T, name, pkg, dir string) string {
	t.Helper()
	for _, p := range []string{filepath.Join(dir, name), name} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	msg := fmt.Sprintf("this test needs %s: install %s (on Debian, apt-get install it)", name, pkg)
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// serverDir is a temporary directory where servers run, as the postgres OS
// user if this is root (PostgreSQL and PgBouncer refuse root).
type serverDir struct {
	t    *testing.T
	dir  string
	cred *syscall.Credential
}

func newServerDir(t *testing.T) *serverDir {
	t.Helper()
	s := &serverDir{t: t, dir: t.TempDir()}
	if os.Geteuid() != 0 {
		return s
	}
	u, err := osuser.Lookup("postgres")
	if err != nil {
		t.Fatalf("running as root, and no postgres OS user to run servers as: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	for _, err := range []error{os.Chmod(filepath.Dir(s.dir), 0o711), os.Chown(s.dir, uid, gid)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// command runs the program at path in the directory, killed if the test process dies.
func (s *serverDir) command(path string, args ...string) *exec.Cmd {
	cmd := exec.Command(path, args...)
	cmd.Dir = s.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Pdeathsig: syscall.SIGKILL}
	return cmd
}

// pg returns a command that runs one of PostgreSQL's server programs.
func (s *serverDir) pg(name string, args ...string) *exec.Cmd {
	s.t.Helper()
	bin, _ := exec.Command("pg_config", "--bindir").Output()
	return s.command(serverProgram(s.t, name, "PostgreSQL's server programs (postgresql)", strings.TrimSpace(string(bin))), args...)
}

// runPG runs a PostgreSQL program to its end, and fails the test if it fails.
func (s *serverDir) runPG(name string, args ...string) {
	s.t.Helper()
	if out, err := s.pg(name, args...).CombinedOutput(); err != nil {
		s.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// startPG starts data directory name's server on port, until the test ends.
func (s *serverDir) startPG(name, port, options string) {
	s.t.Helper()
	opts := fmt.Sprintf("-p %s -k %s -c listen_addresses=127.0.0.1 -c fsync=off %s", port, s.dir, options)
	s.t.Cleanup(func() { s.pg("pg_ctl", "-D", name, "-m", "immediate", "stop").Run() })
	if out, err := s.pg("pg_ctl", "-D", name, "-l", name+".log", "-o", opts, "-w", "-t", "60", "start").CombinedOutput(); err != nil {
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
			pg := newServerDir(t)
			_, primaryPort, _ := net.SplitHostPort(closedAddr(t))
			_, standbyPort, _ := net.SplitHostPort(closedAddr(t))
			// A primary that waits for its standby on every commit; only it gets
			// synchronous_standby_names, or the promoted standby would wait too.
			pg.runPG("initdb", "-D", "primary", "-A", "trust", "-U", "postgres", "-N")
			pg.startPG("primary", primaryPort, "-c synchronous_standby_names=standby")
			pg.runPG("pg_basebackup", "-d", "host=127.0.0.1 port="+primaryPort+" user=postgres application_name=standby",
				"-D", "standby", "-R", "-X", "stream", "-c", "fast")
			pg.startPG("standby", standbyPort, "")
			primaryDB := openDB(t, "host=127.0.0.1 port="+primaryPort+" user=postgres dbname=postgres sslmode=disable")
			waitUntil(t, "the standby is synchronous", func() bool {
				var state string
				primaryDB.QueryRow(`SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'`).Scan(&state)
				return state == "sync"
			})
			// The service, with its production bound, reaches the primary through a proxy.
			proxy := newProxy(t, "tcp", "127.0.0.1:"+primaryPort)
			_, proxyPort, _ := net.SplitHostPort(proxy.addr)
			dsn := "host=127.0.0.1,127.0.0.1 port=" + proxyPort + "," + standbyPort + " user=postgres dbname=postgres sslmode=disable target_session_attrs=read-write"
			e := newTestEnv(t, withStore(newStoreAt(t, dsn)))
			load := startCreateLoad(t, e)
			load.waitFor(t, 20, http.StatusCreated, time.Now())
			faultStart := time.Now()
			if fault == "frozen" {
				proxy.stalled.Store(true)
			} else {
				pg.runPG("pg_ctl", "-D", "primary", "-m", "immediate", "stop")
			}
			faultEnd := time.Now()
			load.waitFor(t, 8, http.StatusServiceUnavailable, faultEnd)
			mustAllRetryLater(t, e, 1)
			promoted := time.Now()
			pg.runPG("pg_ctl", "-D", "standby", "-w", "-t", "60", "promote")
			load.waitFor(t, 20, http.StatusCreated, promoted)
			load.stop()
			load.check(t, openDB(t, "host=127.0.0.1 port="+standbyPort+" user=postgres dbname=postgres sslmode=disable"), faultStart, faultEnd)
		})
	}
}

// TestWriteTransactions checks that a write is READ COMMITTED whatever the
// default (a stricter level fails updates that waited for a lock), under
// the server's own timeouts, and that the bounds are ordered.
func TestWriteTransactions(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	st := newStoreWith(t, withParam(databaseURL, "default_transaction_isolation", "serializable"), testPool, time.Second)
	var got [3]string
	err := st.write(context.Background(), func(ctx context.Context, conn *sql.Conn) error {
		return conn.QueryRowContext(ctx, `SELECT current_setting('transaction_isolation'), current_setting('lock_timeout'), current_setting('statement_timeout')`).Scan(&got[0], &got[1], &got[2])
	})
	if want := [3]string{"read committed", "600ms", "800ms"}; err != nil || got != want {
		t.Errorf("a write's transaction: %q (%v), want %q", got, err, want)
	}
	for _, call := range []time.Duration{300 * time.Millisecond, time.Second, queryTimeout} {
		if b := newBounds(call); !(0 < b.lock && b.lock < b.statement && b.statement < b.call && b.call == call && b.call < b.silence && b.silence <= call+time.Second) {
			t.Errorf("newBounds(%v) = %+v, want 0 < lock < statement < call < silence <= call + 1s", call, b)
		}
	}
}

package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	osuser "os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lib/pq"
	"golang.org/x/crypto/bcrypt"
)

// testClock is a clock that only a test moves, for the sign-in throttle.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

// newTestClock returns a clock at a fixed time, whole in microseconds as
// PostgreSQL keeps times.
func newTestClock() *testClock {
	return &testClock{t: time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// newClockedStore opens a store on a fresh schema whose throttle reads
// clock.
func newClockedStore(t *testing.T, clock *testClock) *store {
	t.Helper()
	st := newTestStore(t)
	st.now = clock.now
	return st
}

// countAuthFailure calls CountAuthFailure and fails the test on an error.
func countAuthFailure(t *testing.T, st *store, email string) time.Duration {
	t.Helper()
	wait, err := st.CountAuthFailure(context.Background(), email)
	if err != nil {
		t.Fatalf("CountAuthFailure(%q): %v", email, err)
	}
	return wait
}

// authFailures returns the failures counted for email, and -1 if it has no
// row.
func authFailures(t *testing.T, st *store, email string) int {
	t.Helper()
	n := -1
	st.db.QueryRow(`SELECT failures FROM auth_failures WHERE email = $1`, email).Scan(&n)
	return n
}

func TestConcurrentAuthFailuresAreCountedExactly(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	// Two replicas on one database.
	databaseURL, _ := newSchema(t)
	replicas := []*store{newStoreAt(t, databaseURL), newStoreAt(t, databaseURL)}
	for _, st := range replicas {
		st.now = clock.now
	}
	const attempts = 40
	run := func() (counted int, waits map[time.Duration]int) {
		var mu sync.Mutex
		waits = make(map[time.Duration]int)
		var wg sync.WaitGroup
		for i := 0; i < attempts; i++ {
			wg.Add(1)
			go func(st *store) {
				defer wg.Done()
				wait, err := st.CountAuthFailure(context.Background(), "ann@example.com")
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err != nil:
					t.Errorf("CountAuthFailure: %v", err)
				case wait == 0:
					counted++
				default:
					waits[wait]++
				}
			}(replicas[i%2])
		}
		wg.Wait()
		return counted, waits
	}
	// At one instant, only the five free attempts count; every other one
	// is early, by the full first wait.
	if counted, waits := run(); counted != 5 || waits[time.Second] != attempts-5 {
		t.Errorf("%d attempts at once: %d counted, waits %v; want 5 counted and %d told to wait 1s", attempts, counted, waits, attempts-5)
	}
	clock.advance(time.Second)
	if counted, waits := run(); counted != 1 || waits[2*time.Second] != attempts-1 {
		t.Errorf("%d attempts at once after 1s: %d counted, waits %v; want 1 counted and %d told to wait 2s", attempts, counted, waits, attempts-1)
	}
	if n := authFailures(t, replicas[0], "ann@example.com"); n != 6 {
		t.Errorf("failures stored = %d, want 6", n)
	}
}

func TestAuthFailuresAreForgottenAfterADay(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	st := newClockedStore(t, clock)
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		countAuthFailure(t, st, "ann@example.com")
	}
	if wait, err := st.AuthWait(ctx, "ann@example.com"); err != nil || wait != time.Second {
		t.Fatalf("AuthWait after 5 failures = %v, %v; want 1s", wait, err)
	}
	clock.advance(24*time.Hour - time.Microsecond)
	countAuthFailure(t, st, "ann@example.com")
	if n := authFailures(t, st, "ann@example.com"); n != 6 {
		t.Fatalf("failures a moment before a day passed = %d, want 6", n)
	}
	clock.advance(24 * time.Hour)
	if wait, err := st.AuthWait(ctx, "ann@example.com"); err != nil || wait != 0 {
		t.Errorf("AuthWait a day after the last failure = %v, %v; want 0", wait, err)
	}
	countAuthFailure(t, st, "ann@example.com")
	if n := authFailures(t, st, "ann@example.com"); n != 1 {
		t.Errorf("failures counted after a forgotten count = %d, want the count to start again at 1", n)
	}
}

func TestForgottenAuthFailuresAreDeleted(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	st := newClockedStore(t, clock)
	// A flood of random addresses, each failing once.
	for i := 0; i < 26; i++ {
		countAuthFailure(t, st, fmt.Sprintf("flood%d@example.com", i))
	}
	clock.advance(12 * time.Hour)
	countAuthFailure(t, st, "ann@example.com")
	countAuthFailure(t, st, "ann@example.com")
	clock.advance(12 * time.Hour)
	// Each counted failure deletes up to ten forgotten rows, so their number
	// falls while new failures come in, and the table keeps only the last
	// day's addresses.
	for i, want := range []int{18, 9, 4, 5} {
		countAuthFailure(t, st, fmt.Sprintf("new%d@example.com", i))
		var rows int
		if err := st.db.QueryRow(`SELECT count(*) FROM auth_failures`).Scan(&rows); err != nil {
			t.Fatal(err)
		}
		if rows != want {
			t.Errorf("after failure %d of new addresses: %d rows, want %d", i+1, rows, want)
		}
	}
	if n := authFailures(t, st, "ann@example.com"); n != 2 {
		t.Errorf("ann@example.com's count = %d after the clean-up, want 2: live rows are kept", n)
	}
}

// TestTransactionPooler drives the API through a real PgBouncer in
// transaction pooling mode, whose small pool hands each server connection to
// many client connections in turn, and through a direct connection. Both
// must answer alike, with no 5xx.
func TestTransactionPooler(t *testing.T) {
	t.Parallel()
	bouncerURL := startPgBouncer(t)
	pool := poolConfig{maxOpen: 16, maxIdle: 16, maxIdleTime: time.Minute, transactionPooler: true}
	st, err := openStore(context.Background(), bouncerURL, pool, 30*time.Second)
	if err != nil {
		t.Fatalf("openStore through PgBouncer: %v", err)
	}
	t.Cleanup(func() { st.Close() })

	direct := poolerWorkload(t, newTestEnv(t))
	pooled := poolerWorkload(t, newTestEnv(t, withStore(st)))
	t.Logf("requests: %d direct, %d through PgBouncer", direct.requests, pooled.requests)
	if pooled.requests != direct.requests {
		t.Errorf("PgBouncer: %d requests, direct: %d; want the same", pooled.requests, direct.requests)
	}
	for k, n := range direct.answers {
		if pooled.answers[k] != n {
			t.Errorf("%s: %d through PgBouncer, %d direct", k, pooled.answers[k], n)
		}
	}
	for k, n := range pooled.answers {
		if _, ok := direct.answers[k]; !ok {
			t.Errorf("%s: %d through PgBouncer, none direct", k, n)
		}
	}
	if !slices.Equal(pooled.users, direct.users) {
		t.Errorf("users through PgBouncer:\n%v\nwant, as direct:\n%v", pooled.users, direct.users)
	}
	// The premise: the service's connections outnumbered the server's.
	if open := st.db.Stats().OpenConnections; open <= pgBouncerPoolSize {
		t.Errorf("the service opened %d connections to PgBouncer, want more than its pool of %d", open, pgBouncerPoolSize)
	}
}

// poolerSummary is what a workload saw, in terms that do not depend on
// which of the racing requests won.
type poolerSummary struct {
	requests int
	answers  map[string]int // "METHOD route: status" → count
	users    []string       // the final users, normalized and sorted
}

// poolerWorkload runs concurrent creates, concurrent PUTs of one email,
// deletes, look-ups, lists and pages against e, fails the test on any 5xx or
// unexpected answer, and summarizes what it saw.
func poolerWorkload(t *testing.T, e *testEnv) poolerSummary {
	t.Helper()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("service's errors:\n%s", grepLines(e.logs.String(), "level=ERROR"))
		}
	})
	var mu sync.Mutex
	sum := poolerSummary{answers: map[string]int{}}
	do := func(route, method, path, body string) response {
		r := e.do(method, path, body)
		if r.status >= 500 || r.status == 0 {
			t.Errorf("%s", r)
		}
		mu.Lock()
		sum.requests++
		sum.answers[fmt.Sprintf("%s %s: %d", method, route, r.status)]++
		mu.Unlock()
		return r
	}
	const (
		creates    = 40 // distinct users
		sameEmail  = 16 // creates of one email
		contenders = 20 // users whose PUTs race for one email
		deletes    = 8  // users deleted twice at once
		walkers    = 8  // clients paging through the list at once
	)
	// all runs f(0) to f(n-1) at once.
	all := func(n int, f func(i int)) {
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { f(i) })
		}
		wg.Wait()
	}

	// Goroutines only collect answers: checks that stop the test run on
	// the test's own goroutine.
	created := make([]response, creates)
	all(creates+sameEmail, func(i int) {
		if i >= creates {
			do("/users", "POST", "/users", userBody("Same", "Email", "same@example.com", "password1"))
			return
		}
		first, email := "User", fmt.Sprintf("user%d@example.com", i)
		if i < contenders {
			first, email = "Contender", fmt.Sprintf("contender%d@example.com", i)
		}
		created[i] = do("/users", "POST", "/users", userBody(first, "Last", email, "password1"))
	})
	ids := make([]int64, creates)
	for i, r := range created {
		ids[i] = mustUser(t, r, http.StatusCreated).ID
	}

	// The contenders all want one email while others read and delete.
	all(contenders+2*deletes+creates+walkers, func(i int) {
		switch {
		case i < contenders:
			do("/users/{id}", "PUT", fmt.Sprintf("/users/%d", ids[i]), `{"email":"taken@example.com"}`)
		case i < contenders+2*deletes:
			do("/users/{id}", "DELETE", fmt.Sprintf("/users/%d", ids[contenders+(i-contenders)/2]), "")
		case i < contenders+2*deletes+creates:
			j := i - contenders - 2*deletes
			if j < contenders || j >= contenders+deletes { // not deleted meanwhile
				do("/users/{id}", "GET", fmt.Sprintf("/users/%d", ids[j]), "")
			}
		default:
			do("/users", "GET", "/users?email=same@example.com", "")
		}
	})

	// Lists and pages, all at once, of the settled table.
	lists := make([][]response, 2*walkers)
	link := regexp.MustCompile(`^<([^>]+)>; rel="next"$`)
	all(2*walkers, func(i int) {
		if i < walkers {
			lists[i] = []response{do("/users/", "GET", "/users/", "")}
			return
		}
		for path := fmt.Sprintf("/users?limit=%d", 3+i%5); path != ""; {
			r := do("/users", "GET", path, "")
			lists[i] = append(lists[i], r)
			path = ""
			if m := link.FindStringSubmatch(r.header.Get("Link")); m != nil {
				path = m[1]
			}
		}
	})
	var full []userJSON
	for i, pages := range lists {
		var got []userJSON
		for _, r := range pages {
			got = append(got, mustList(t, r)...)
		}
		if i == 0 {
			full = got
		} else if fmt.Sprint(got) != fmt.Sprint(full) {
			t.Errorf("list %d differs from the first:\n%v\nwant\n%v", i, got, full)
		}
	}
	// Which contender won the email differs from run to run; that exactly
	// one did is the result.
	for _, u := range full {
		email := u.Email
		if strings.HasPrefix(email, "contender") {
			email = "contender@example.com"
		}
		sum.users = append(sum.users, u.FirstName+" "+u.LastName+" "+email)
	}
	slices.Sort(sum.users)
	return sum
}

// pgBouncerPoolSize is the number of server connections PgBouncer keeps for
// the test's database: far fewer than the service's pool.
const pgBouncerPoolSize = 2

// startPgBouncer starts PgBouncer in transaction pooling mode in front of a
// database of its own, created for the test, and returns the URL that
// reaches that database through it. Both are gone when the test ends.
//
// A database of its own, because PgBouncer refuses the search_path startup
// parameter that newSchema's URLs carry.
func startPgBouncer(t *testing.T) string {
	t.Helper()
	binary, err := exec.LookPath("pgbouncer")
	if err != nil {
		// Debian installs it in /usr/sbin, which a user's PATH may lack.
		binary = "/usr/sbin/pgbouncer"
		if _, err := os.Stat(binary); err != nil {
			const msg = "pgbouncer is not installed: install the pgbouncer package (apt-get install pgbouncer) to run this test"
			if os.Getenv("CI") != "" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
	server, err := pq.NewConfig(testDatabaseURL())
	if err != nil {
		t.Fatal(err)
	}

	b := make([]byte, 8)
	rand.Read(b)
	database := "test_pooler_" + hex.EncodeToString(b)
	if _, err := adminDB.Exec(`CREATE DATABASE ` + database); err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		if _, err := adminDB.Exec(`DROP DATABASE ` + database + ` WITH (FORCE)`); err != nil {
			t.Errorf("drop database %s: %v", database, err)
		}
	})

	// PgBouncer refuses to run as root: then it runs as postgres, and its
	// configuration must be readable by that user.
	var cred *syscall.Credential
	dir := t.TempDir()
	if os.Geteuid() == 0 {
		pg, err := osuser.Lookup("postgres")
		if err != nil {
			t.Fatalf("PgBouncer cannot run as root, and there is no postgres user to run it as: %v", err)
		}
		uid, _ := strconv.Atoi(pg.Uid)
		gid, _ := strconv.Atoi(pg.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		for _, d := range []string{filepath.Dir(dir), dir} {
			if err := os.Chmod(d, 0o711); err != nil {
				t.Fatal(err)
			}
		}
	}

	// Another process may take a free port before PgBouncer binds it: then
	// PgBouncer exits, and the next try takes another port.
	var last string
	for range 5 {
		port := freePort(t)
		conf := filepath.Join(dir, "pgbouncer.ini")
		if err := os.WriteFile(conf, []byte(pgBouncerConfig(server, database, port)), 0o600); err != nil {
			t.Fatal(err)
		}
		if cred != nil {
			if err := os.Chown(conf, int(cred.Uid), int(cred.Gid)); err != nil {
				t.Fatal(err)
			}
		}
		bouncerURL := fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s?sslmode=disable",
			server.User, port, database)
		ok, output := runPgBouncer(t, binary, conf, cred, bouncerURL)
		if ok {
			return bouncerURL
		}
		last = output
	}
	t.Fatalf("PgBouncer did not start; its output:\n%s", last)
	return ""
}

// runPgBouncer starts PgBouncer with conf and waits until bouncerURL answers
// through it. If it does, PgBouncer is stopped when the test ends; if it
// exits first, runPgBouncer returns false and its output.
func runPgBouncer(t *testing.T, binary, conf string, cred *syscall.Credential, bouncerURL string) (ok bool, output string) {
	t.Helper()
	out := &syncBuffer{}
	cmd := exec.Command(binary, conf)
	cmd.Stdout, cmd.Stderr = out, out
	// If the test process dies without cleaning up, PgBouncer stops too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pgbouncer: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		cmd.Process.Signal(syscall.SIGTERM) // immediate shutdown
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	}

	db, err := sql.Open("postgres", bouncerURL)
	if err != nil {
		stop()
		t.Fatal(err)
	}
	defer db.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := db.PingContext(ctx)
		cancel()
		if err == nil {
			t.Cleanup(stop)
			return true, ""
		}
		select {
		case <-exited:
			return false, out.String()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			stop()
			t.Fatalf("PgBouncer at %s did not answer within 30 s: %v; its output:\n%s", bouncerURL, err, out)
		}
	}
}

// pgBouncerConfig returns a PgBouncer configuration that listens on
// 127.0.0.1:port only and pools transactions to database on server in a
// small pool. Clients need no password: PgBouncer logs in as server.User.
// It has no ignore_startup_parameters, so a startup parameter that PgBouncer
// refuses in production fails the test too.
func pgBouncerConfig(server pq.Config, database string, port int) string {
	quote := func(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
	target := fmt.Sprintf("host=%s port=%d dbname=%s user=%s", quote(server.Host), server.Port, database, quote(server.User))
	if server.Password != "" {
		target += " password=" + quote(server.Password)
	}
	return fmt.Sprintf(`[databases]
%s = %s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = %d
max_client_conn = 100
log_connections = 0
log_disconnections = 0
`, database, target, port, pgBouncerPoolSize)
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// grepLines returns the lines of s that contain substr.
func grepLines(s, substr string) string {
	var b strings.Builder
	for line := range strings.Lines(s) {
		if strings.Contains(line, substr) {
			b.WriteString(line)
		}
	}
	return b.String()
}

// newDatabase creates an empty database that is dropped when the test ends,
// for tests that change settings of a whole database. It returns a
// connection URL for it and its name.
func newDatabase(t *testing.T) (databaseURL, name string) {
	t.Helper()
	b := make([]byte, 8)
	rand.Read(b)
	name = "users_test_" + hex.EncodeToString(b)
	if _, err := adminDB.Exec(`CREATE DATABASE ` + name); err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		if _, err := adminDB.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	databaseURL = testDatabaseURL()
	if u, err := url.Parse(databaseURL); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		u.Path = "/" + name
		return u.String(), name
	}
	return databaseURL + " dbname=" + name, name
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

func TestTimedOutWritesAreNotAppliedLater(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	databaseURL = withParam(databaseURL, "application_name", schema)
	const users, writes = 6, 24
	st, err := openStore(context.Background(), databaseURL, poolConfig{maxOpen: writes, maxIdle: writes, maxIdleTime: time.Minute}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e := newTestEnv(t, withStore(st))
	ids := make([]int64, users)
	for i := range ids {
		ids[i] = e.createUser(t, "Ann", "Lee", fmt.Sprintf("ann%d@example.com", i), "password1").ID
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
		id := ids[i%users]
		switch i % 3 {
		case 0:
			return e.do("PUT", fmt.Sprintf("/users/%d", id), `{"first_name":"Changed"}`)
		case 1:
			return e.do("PUT", fmt.Sprintf("/users/%d", id), `{"password":"changed-password"}`)
		default:
			return e.do("DELETE", fmt.Sprintf("/users/%d", id), "")
		}
	})
	for _, r := range rs {
		mustRetryLater(t, r)
	}
	// PostgreSQL itself gave up on them, before the service did.
	if !strings.Contains(e.logs.String(), "canceling statement due to lock timeout") {
		t.Errorf("no write was stopped by the server's lock_timeout; log:\n%s", e.logs)
	}
	var hashesBefore string
	if err := adminDB.QueryRow(`SELECT string_agg(password, ',' ORDER BY id) FROM ` + schema + `.users`).Scan(&hashesBefore); err != nil {
		t.Fatal(err)
	}
	lock.Rollback()

	// Whatever the server still had queued for the service runs now: wait
	// until none of its statements is running.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var running int
		if err := adminDB.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state <> 'idle'`, schema).Scan(&running); err != nil {
			t.Fatal(err)
		}
		if running == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d statements of the service still running 10s after the rows were released", running)
		}
		time.Sleep(10 * time.Millisecond)
	}
	var n, changed int
	var hashesAfter string
	err = adminDB.QueryRow(`SELECT count(*), count(*) FILTER (WHERE first_name <> 'Ann'), string_agg(password, ',' ORDER BY id) FROM `+schema+`.users`).
		Scan(&n, &changed, &hashesAfter)
	if err != nil {
		t.Fatal(err)
	}
	if n != users || changed != 0 || hashesAfter != hashesBefore {
		t.Errorf("after %d writes answered 503: %d of %d users left, %d names changed, passwords changed: %v; want nothing changed",
			writes, n, users, changed, hashesAfter != hashesBefore)
	}
}

func TestNotNowDatabaseStatesAnswer503(t *testing.T) {
	t.Parallel()
	databaseURL, name := newDatabase(t)
	databaseURL = withParam(databaseURL, "application_name", name)
	st := newStoreAt(t, databaseURL)
	e := newTestEnv(t, withStore(st))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
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
		r := e.do(rq.method, rq.path, rq.body)
		if rq.method == "GET" {
			if r.status != http.StatusOK {
				t.Errorf("%s on a read-only database, want 200", r)
			}
			continue
		}
		mustRetryLater(t, r)
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
	e.createUser(t, "Bob", "Ray", "bob@example.com", "password1")
}

func TestHealthzAfterConnectionsAreKilled(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	databaseURL = withParam(databaseURL, "application_name", schema)
	e := newTestEnv(t, withStore(newStoreAt(t, databaseURL)))
	for round := 0; round < 3; round++ {
		// Fill the pool with connections, then kill every one.
		concurrently(testPool.maxOpen, func(int) response { return e.do("GET", "/healthz", "") })
		killConnections(t, schema)
		for i := 0; i < testPool.maxOpen; i++ {
			if r := e.do("GET", "/healthz", ""); r.status != http.StatusOK {
				t.Fatalf("round %d, call %d after the pool's connections were killed: %s, want 200: the database answers", round, i, r)
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

// pgServers runs PostgreSQL servers of the test's own, from the server
// binaries on this machine, in a temporary directory: stopped and removed
// when the test ends, whatever happened.
type pgServers struct {
	t   *testing.T
	bin string // pg_config --bindir
	dir string
}

func newPGServers(t *testing.T) *pgServers {
	t.Helper()
	out, err := exec.Command("pg_config", "--bindir").Output()
	bin := strings.TrimSpace(string(out))
	for _, name := range []string{"initdb", "pg_ctl", "pg_basebackup"} {
		if _, statErr := os.Stat(filepath.Join(bin, name)); err == nil && statErr != nil {
			err = statErr
		}
	}
	if err != nil {
		msg := fmt.Sprintf("this test needs PostgreSQL's server binaries (initdb, pg_ctl, pg_basebackup, in the directory pg_config --bindir prints): install them, on Debian with apt-get install postgresql (%v)", err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	dir, err := os.MkdirTemp("", "users-pg-")
	if err != nil {
		t.Fatal(err)
	}
	s := &pgServers{t: t, bin: bin, dir: dir}
	t.Cleanup(func() {
		for _, name := range s.names() {
			s.pgctl("-D", filepath.Join(dir, name), "-m", "immediate", "stop")
		}
		os.RemoveAll(dir)
	})
	// The servers run as the postgres OS user if this is root, since
	// initdb refuses root: the directory is theirs.
	if os.Geteuid() == 0 {
		u, err := osuser.Lookup("postgres")
		if err != nil {
			t.Fatalf("running as root, and no postgres OS user to run PostgreSQL as: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// names lists the data directories made so far.
func (s *pgServers) names() []string {
	entries, _ := os.ReadDir(s.dir)
	var names []string
	for _, e := range entries {
		if e.IsDir() {
			names = append(names, e.Name())
		}
	}
	return names
}

// run runs a server binary, as the postgres OS user if this is root.
func (s *pgServers) run(name string, args ...string) error {
	path := filepath.Join(s.bin, name)
	cmd := exec.Command(path, args...)
	if os.Geteuid() == 0 {
		cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--", path}, args...)...)
	}
	cmd.Dir = s.dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

func (s *pgServers) pgctl(args ...string) error { return s.run("pg_ctl", args...) }

// start starts the server in data directory name on port, with extra
// settings, and waits until it takes connections.
func (s *pgServers) start(name string, port int, settings ...string) {
	s.t.Helper()
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off", port, s.dir)
	for _, setting := range settings {
		opts += " -c " + setting
	}
	dataDir := filepath.Join(s.dir, name)
	if err := s.pgctl("-D", dataDir, "-l", dataDir+".log", "-o", opts, "-w", "-t", "60", "start"); err != nil {
		log, _ := os.ReadFile(dataDir + ".log")
		s.t.Fatalf("%v\n%s", err, log)
	}
}

// waitFor polls cond until it is true, and fails the test if that takes
// longer than within.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestFailoverDrill(t *testing.T) {
	t.Parallel()
	pg := newPGServers(t)
	primaryPort, standbyPort := freePort(t), freePort(t)

	// A primary that waits for its standby on every commit. Only the
	// primary gets synchronous_standby_names, on its command line: the
	// standby, promoted, would otherwise wait for a standby of its own.
	if err := pg.run("initdb", "-D", filepath.Join(pg.dir, "primary"), "-A", "trust", "-U", "postgres", "-N"); err != nil {
		t.Fatal(err)
	}
	pg.start("primary", primaryPort, "synchronous_standby_names=standby")
	if err := pg.run("pg_basebackup", "-d", fmt.Sprintf("host=127.0.0.1 port=%d user=postgres application_name=standby", primaryPort),
		"-D", filepath.Join(pg.dir, "standby"), "-R", "-X", "stream", "-c", "fast"); err != nil {
		t.Fatal(err)
	}
	pg.start("standby", standbyPort)
	primaryDB := openDB(t, fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable", primaryPort))
	waitFor(t, 30*time.Second, "the standby is synchronous", func() bool {
		var state string
		primaryDB.QueryRow(`SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'`).Scan(&state)
		return state == "sync"
	})

	// The service, on both, in the form operators copy from PostgreSQL's
	// documentation, with its production bound; and a second copy told
	// any host will do, whose writes reach the standby while it is
	// read-only.
	var envs []*testEnv
	for _, attrs := range []string{"&target_session_attrs=read-write", ""} {
		dsn, err := parseDatabaseURL(fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/postgres?sslmode=disable%s", primaryPort, standbyPort, attrs))
		if err != nil {
			t.Fatal(err)
		}
		st, err := openStore(context.Background(), dsn, testPool, queryTimeout)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		envs = append(envs, newTestEnv(t, withStore(st)))
	}

	// Creates, from four clients, until told to stop.
	var mu sync.Mutex
	var outcomes []outcome
	count := func(status int, since time.Time) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, o := range outcomes {
			if o.status == status && !o.start.Before(since) {
				n++
			}
		}
		return n
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(stopLoad)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				email := fmt.Sprintf("drill%d-%d@example.com", w, i)
				start := time.Now()
				r := envs[w%2].do("POST", "/users", userBody("Drill", "Test", email, "password1"))
				if r.status == http.StatusServiceUnavailable && r.header.Get("Retry-After") == "" {
					t.Errorf("%s: 503 without Retry-After", r.what)
				}
				mu.Lock()
				outcomes = append(outcomes, outcome{email, r.status, start, time.Now()})
				mu.Unlock()
			}
		}()
	}
	begin := time.Now()
	waitFor(t, 30*time.Second, "20 creates on the primary", func() bool { return count(http.StatusCreated, begin) >= 20 })

	// The primary dies.
	killStart := time.Now()
	if err := pg.pgctl("-D", filepath.Join(pg.dir, "primary"), "-m", "immediate", "stop"); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	waitFor(t, 20*time.Second, "503s while there is no primary", func() bool { return count(http.StatusServiceUnavailable, killed) >= 8 })
	// The standby takes over.
	promoted := time.Now()
	if err := pg.pgctl("-D", filepath.Join(pg.dir, "standby"), "-w", "-t", "60", "promote"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "a 201 from the new primary", func() bool { return count(http.StatusCreated, promoted) >= 1 })
	waitFor(t, 30*time.Second, "20 creates on the new primary", func() bool { return count(http.StatusCreated, promoted) >= 20 })
	stopLoad()

	// Every 201 is on the new primary; a create answered 503 left nothing,
	// unless it was in flight when the primary died: its commit may have
	// reached the standby with its answer lost.
	stored := map[string]bool{}
	newPrimary := openDB(t, fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable", standbyPort))
	rows, err := newPrimary.Query(`SELECT email FROM users`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var email string
		rows.Scan(&email)
		stored[email] = true
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	var created, unavailable, other, lost, inFlight, inFlightStored int
	var slowest, firstAfter time.Duration
	for _, o := range outcomes {
		slowest = max(slowest, o.end.Sub(o.start))
		switch o.status {
		case http.StatusCreated:
			created++
			if !stored[o.email] {
				lost++
				t.Errorf("create of %s answered 201 at %v but is not on the new primary", o.email, o.end.Sub(killed))
			}
			if !o.start.Before(promoted) && (firstAfter == 0 || o.end.Sub(promoted) < firstAfter) {
				firstAfter = o.end.Sub(promoted)
			}
		case http.StatusServiceUnavailable:
			unavailable++
			if o.start.Before(killed) && o.end.After(killStart) {
				inFlight++
				if stored[o.email] {
					inFlightStored++
				}
				continue
			}
			if stored[o.email] {
				t.Errorf("create of %s answered 503 but is on the new primary", o.email)
			}
		default:
			other++
			t.Errorf("create of %s answered %d, want 201 or 503", o.email, o.status)
		}
	}
	if !strings.Contains(envs[1].logs.String(), "read-only transaction") {
		t.Errorf("no create reached the read-only standby; the second service's log:\n%s", envs[1].logs)
	}
	if slowest > queryTimeout+time.Second {
		t.Errorf("slowest answer %v, want at most the query bound %v plus a second", slowest, queryTimeout)
	}
	t.Logf("failover drill: %d creates: %d answered 201, %d answered 503 (%d in flight when the primary died, %d of those stored), %d other; slowest answer %v; first 201 %v after the promotion began; writes lost: %d",
		len(outcomes), created, unavailable, inFlight, inFlightStored, other, slowest.Round(time.Millisecond), firstAfter.Round(time.Millisecond), lost)
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

func TestWritesAfterConnectionsAreKilled(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	databaseURL = withParam(databaseURL, "application_name", schema)
	e := newTestEnv(t, withStore(newStoreAt(t, databaseURL)))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	// Fill the pool with connections, then kill every one: the database
	// is fine, and a write must not fail for a dead pooled connection.
	concurrently(testPool.maxOpen, func(int) response { return e.do("GET", fmt.Sprintf("/users/%d", u.ID), "") })
	killConnections(t, schema)
	for i := 0; i < testPool.maxOpen; i++ {
		if r := e.do("PUT", fmt.Sprintf("/users/%d", u.ID), fmt.Sprintf(`{"first_name":"Ann%d"}`, i)); r.status != 200 {
			t.Fatalf("%s\n%s", r, e.logs)
		}
	}
}

// concurrently runs f(i) for i in [0, n) at once and returns the responses.
func concurrently(n int, f func(i int) response) []response {
	out := make([]response, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			out[i] = f(i)
		}(i)
	}
	close(start)
	wg.Wait()
	return out
}

func TestRaceToCreateOneEmail(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for round := 0; round < 20; round++ {
		email := fmt.Sprintf("race%d@example.com", round)
		rs := concurrently(50, func(i int) response {
			return e.do("POST", "/users/", userBody("Ann", "Lee", email, "password1"))
		})
		created := 0
		for _, r := range rs {
			switch {
			case r.status == http.StatusCreated:
				created++
			case r.status == http.StatusBadRequest && strings.Contains(string(r.body), `"Email already registered"`):
			default:
				t.Errorf("round %d: %s, want 201 or 400 Email already registered", round, r)
			}
		}
		if created != 1 {
			t.Errorf("round %d: %d of 50 creates of one email succeeded, want 1", round, created)
		}
	}
	if n := countUsers(t, e.store); n != 20 {
		t.Errorf("%d users stored after 20 rounds, want 20", n)
	}
}

func TestRaceToTakeOneEmail(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	var ids []int64
	for i := 0; i < 20; i++ {
		ids = append(ids, e.createUser(t, "User", "Racer", fmt.Sprintf("u%d@example.com", i), "password1").ID)
	}
	rs := concurrently(20, func(i int) response {
		return e.do("PUT", fmt.Sprintf("/users/%d", ids[i]), `{"email":"Wanted@Example.com"}`)
	})
	changed := 0
	for _, r := range rs {
		switch {
		case r.status == http.StatusOK:
			changed++
		case r.status == http.StatusBadRequest && strings.Contains(string(r.body), `"Email already registered"`):
		default:
			t.Errorf("%s, want 200 or 400 Email already registered", r)
		}
	}
	var holders int
	e.store.db.QueryRow(`SELECT count(*) FROM users WHERE email = 'wanted@example.com'`).Scan(&holders)
	if changed > 1 || holders != changed {
		t.Errorf("%d updates to one email succeeded and %d users hold it; want at most one, the same", changed, holders)
	}
}

func TestRaceUpdateAndDelete(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for round := 0; round < 10; round++ {
		u := e.createUser(t, "Ann", "Lee", fmt.Sprintf("ann%d@example.com", round), "password1")
		path := fmt.Sprintf("/users/%d", u.ID)
		rs := concurrently(10, func(i int) response {
			if i%2 == 0 {
				return e.do("DELETE", path, "")
			}
			return e.do("PUT", path, fmt.Sprintf(`{"first_name":"Name%d"}`, i))
		})
		deleted := 0
		for _, r := range rs {
			switch {
			case r.status == http.StatusNoContent:
				deleted++
			case r.status == http.StatusOK && strings.HasPrefix(r.what, "PUT"):
			case r.status == http.StatusNotFound && strings.Contains(string(r.body), `"User not found"`):
			default:
				t.Errorf("round %d: %s, want 200, 204 or 404", round, r)
			}
		}
		if deleted != 1 {
			t.Errorf("round %d: %d deletes succeeded, want exactly 1", round, deleted)
		}
		mustError(t, e.do("GET", path, ""), http.StatusNotFound, "User not found")
	}
}

func TestConcurrentUpdatesLoseNoField(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for round := 0; round < 10; round++ {
		u := e.createUser(t, "Ann", "Lee", fmt.Sprintf("ann%d@example.com", round), "password1")
		path := fmt.Sprintf("/users/%d", u.ID)
		bodies := []string{
			`{"first_name":"First"}`,
			`{"last_name":"Last"}`,
			fmt.Sprintf(`{"email":"new%d@example.com"}`, round),
			`{"password":"new password"}`,
		}
		for _, r := range concurrently(len(bodies), func(i int) response { return e.do("PUT", path, bodies[i]) }) {
			mustUser(t, r, http.StatusOK)
		}
		got := mustUser(t, e.do("GET", path, ""), http.StatusOK)
		if got.FirstName != "First" || got.LastName != "Last" || got.Email != fmt.Sprintf("new%d@example.com", round) {
			t.Errorf("round %d: after concurrent updates of different fields: %+v", round, got)
		}
		hash, _ := e.storedSecret(t, u.ID)
		if bcrypt.CompareHashAndPassword([]byte(hash), []byte("new password")) != nil {
			t.Errorf("round %d: the password update was lost", round)
		}
	}
}

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

func TestSchemaIsIdempotentAndSafeForReplicas(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	// Several replicas boot at once on an empty database.
	const replicas = 4
	errs := make(chan error, replicas)
	for i := 0; i < replicas; i++ {
		go func() {
			st, err := openStore(context.Background(), databaseURL, testPool, 5*time.Second)
			if err == nil {
				st.Close()
			}
			errs <- err
		}()
	}
	for i := 0; i < replicas; i++ {
		if err := <-errs; err != nil {
			t.Fatalf("concurrent openStore: %v", err)
		}
	}
	// A restart keeps what is stored.
	st, err := openStore(context.Background(), databaseURL, testPool, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	seedUsers(t, st, 3)
	st.Close()
	st, err = openStore(context.Background(), databaseURL, testPool, 5*time.Second)
	if err != nil {
		t.Fatalf("openStore after a restart: %v", err)
	}
	defer st.Close()
	users, err := st.Users(context.Background(), 0, 10)
	if err != nil || len(users) != 3 {
		t.Fatalf("after a restart: %d users (%v), want 3", len(users), err)
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
}

func TestLookUpByEmailUsesTheUniqueIndex(t *testing.T) {
	t.Parallel()
	st := newTestStore(t)
	seedUsers(t, st, 5000)
	if _, err := st.db.Exec(`ANALYZE users`); err != nil {
		t.Fatal(err)
	}
	rows, err := st.db.Query(`EXPLAIN `+userByEmailQuery, "user42@example.com")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var plan strings.Builder
	for rows.Next() {
		var line string
		rows.Scan(&line)
		plan.WriteString(line + "\n")
	}
	if !strings.Contains(plan.String(), "Index Scan using users_email_key") {
		t.Errorf("look-up by email does not use the unique index:\n%s", plan.String())
	}
}

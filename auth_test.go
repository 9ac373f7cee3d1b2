package main

import (
	"context"
	"database/sql/driver"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func authBody(email, password string) string {
	b, _ := json.Marshal(map[string]string{"email": email, "password": password})
	return string(b)
}

func (e *testEnv) authenticate(email, password string) response {
	e.t.Helper()
	return e.do("POST", "/users/authenticate", authBody(email, password))
}

func mustThrottled(t *testing.T, r response, seconds int) {
	t.Helper()
	mustError(t, r, http.StatusTooManyRequests, "Too many failed attempts")
	if got := r.header.Get("Retry-After"); got != strconv.Itoa(seconds) {
		t.Fatalf("%s: Retry-After = %q, want %d", r.what, got, seconds)
	}
}

func mustWrongCredentials(t *testing.T, r response) {
	t.Helper()
	mustError(t, r, http.StatusBadRequest, "Invalid email or password")
}

func TestAuthenticate(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	long := strings.Repeat("p", maxPasswordBytes)
	ann := e.createUser(t, "Ann", "Lee", "Ann@Example.com", "correct horse")
	e.createUser(t, "Bob", "Ray", "bob@example.com", long)
	// The body of a success is the user, as GET shows it.
	r := e.do("POST", "/users/authenticate", `{"email":"  ANN@example.COM ","password":"correct horse"}`)
	if got := mustUser(t, r, http.StatusOK); got != ann {
		t.Errorf("%s: %+v, want %+v", r.what, got, ann)
	}
	// A wrong password and an unknown email get one answer, byte for byte.
	wrong, unknown := e.authenticate("ann@example.com", "correct horse!"), e.authenticate("nobody@example.com", "correct horse")
	mustWrongCredentials(t, wrong)
	for _, h := range []string{"Content-Type", "Content-Length", "Retry-After", "WWW-Authenticate"} {
		if wrong.header.Get(h) != unknown.header.Get(h) || string(wrong.body) != string(unknown.body) {
			t.Errorf("%s: %q and body %s for a wrong password, %q and %s for an unknown email", h, wrong.header.Get(h), wrong.body, unknown.header.Get(h), unknown.body)
		}
	}
	// bcrypt reads 72 bytes; a longer password must not match through them.
	mustWrongCredentials(t, e.authenticate("bob@example.com", long+"x"))
	mustWrongCredentials(t, e.authenticate("ann@example.com", ""))
	mustWrongCredentials(t, e.authenticate("ann@example.com", "CORRECT HORSE"))
}

func TestAuthenticateThrottleSchedule(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	e := newTestEnv(t, withStore(newClockedStore(t, clock)))
	e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	// The wait after the 5th, 6th, ... consecutive failure, in seconds.
	waits := []int{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900}
	// An unknown address goes through every step exactly as a real one.
	for _, email := range []string{"nobody@example.com", "ann@example.com"} {
		for range 5 {
			mustWrongCredentials(t, e.authenticate(email, "wrong-password"))
		}
		for _, wait := range waits {
			// Early, even with the right password: the whole wait; just before its end, 1 s.
			mustThrottled(t, e.authenticate(email, "passw0rd-1"), wait)
			clock.advance(time.Duration(wait)*time.Second - time.Millisecond)
			mustThrottled(t, e.authenticate(email, "wrong-password"), 1)
			// Those attempts neither counted nor moved the wait.
			clock.advance(time.Millisecond)
			mustWrongCredentials(t, e.authenticate(email, "wrong-password"))
		}
		mustThrottled(t, e.authenticate(email, "wrong-password"), 900)
		clock.advance(900 * time.Second)
	}
	// A success resets the count: five free failures again.
	mustUser(t, e.authenticate("ann@example.com", "passw0rd-1"), http.StatusOK)
	for range 5 {
		mustWrongCredentials(t, e.authenticate("ann@example.com", "wrong-password"))
	}
	mustThrottled(t, e.authenticate("ann@example.com", "passw0rd-1"), 1)
}

// TestAuthenticateRehashes checks that a success with a hash at another cost
// stores one at the hasher's, never over a password changed meanwhile.
func TestAuthenticateRehashes(t *testing.T) {
	t.Parallel()
	st := newTestStore(t)
	old := newTestEnv(t, withStore(st)) // hashes at bcrypt.MinCost
	u := old.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	hash, _ := old.storedSecret(t, u.ID)
	h, active, _, release := gatedHasher(1, time.Minute)
	h.cost = bcrypt.MinCost + 1
	raised := newTestEnv(t, withStore(st), withHasher(h))
	letGo := sync.OnceFunc(func() { close(release) }) // before the server's close, which waits for the gate
	t.Cleanup(letGo)
	mustWrongCredentials(t, raised.authenticate("ann@example.com", "wrong-password"))
	if got, _ := raised.storedSecret(t, u.ID); got != hash {
		t.Fatalf("a failed check changed the stored hash")
	}
	// A success rehashes, but the password changes while it does.
	done := make(chan response, 1)
	go func() { done <- raised.authenticate("ann@example.com", "passw0rd-1") }()
	waitUntil(t, "a hash to start", func() bool { return active.Load() == 1 })
	u = mustUser(t, old.do("PUT", fmt.Sprintf("/users/%d", u.ID), `{"password":"passw0rd-2"}`), http.StatusOK)
	changed, _ := old.storedSecret(t, u.ID)
	letGo()
	mustUser(t, <-done, http.StatusOK)
	if got, _ := old.storedSecret(t, u.ID); got != changed {
		t.Fatalf("the rehash overwrote the password change")
	}
	// With nothing in its way, the rehash is stored, once; the user is the same.
	var rehashed string
	for i := range 2 {
		if got := mustUser(t, raised.authenticate("ann@example.com", "passw0rd-2"), http.StatusOK); got != u {
			t.Errorf("success %d: %+v, want %+v (updated_at unchanged)", i+1, got, u)
		}
		newHash, newSalt := raised.storedSecret(t, u.ID)
		if cost, err := bcrypt.Cost([]byte(newHash)); err != nil || cost != h.cost || newSalt != newHash[:bcryptSaltLen] || i == 1 && newHash != rehashed {
			t.Fatalf("after success %d at the raised cost: hash %q (cost %d, %v), salt %q; want one new hash at cost %d, its salt",
				i+1, newHash, cost, err, newSalt, h.cost)
		}
		rehashed = newHash
	}
}

// authTimings returns the median times of failed checks at cost (a wrong
// password, an unknown email, one over 72 bytes, in turns), and the medians
// of the per-round ratios of the second and third to the first.
func authTimings(t testing.TB, cost, rounds int) (medians [3]time.Duration, ratios [2]float64) {
	clock := newTestClock()
	e := newTestEnv(t, withStore(newClockedStore(t, clock)), withHasher(newHasher(cost, 2, time.Minute)))
	if r := e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "passw0rd-1")); r.status != http.StatusCreated {
		t.Fatalf("%s, want 201", r)
	}
	checks := [][2]string{{"ann@example.com", "wrong-password"}, {"nobody@example.com", "wrong-password"}, {"ann@example.com", strings.Repeat("passw0rd-1", 9)}}
	var samples [5][]float64 // the three times, in ns, and the two ratios
	for i := range rounds {
		clock.advance(24 * time.Hour) // every count forgotten: no 429
		var round [3]float64
		for j := range checks {
			k := (i + j) % len(checks)
			start := time.Now()
			if r := e.authenticate(checks[k][0], checks[k][1]); r.status != http.StatusBadRequest {
				t.Fatalf("%s, want 400", r)
			}
			round[k] = float64(time.Since(start))
		}
		for k, v := range []float64{round[0], round[1], round[2], round[1] / round[0], round[2] / round[0]} {
			samples[k] = append(samples[k], v)
		}
	}
	m := func(k int) float64 { slices.Sort(samples[k]); return samples[k][rounds/2] }
	return [3]time.Duration{time.Duration(m(0)), time.Duration(m(1)), time.Duration(m(2))}, [2]float64{m(3), m(4)}
}

// testClock is a store's clock that only the test moves, in microseconds.
type testClock struct{ micros atomic.Int64 }

func newTestClock() *testClock {
	c := &testClock{}
	c.micros.Store(time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC).UnixMicro())
	return c
}

func (c *testClock) Value() (driver.Value, error) { return time.UnixMicro(c.micros.Load()).UTC(), nil }
func (c *testClock) advance(d time.Duration)      { c.micros.Add(d.Microseconds()) }

// newClockedStore opens a store on a fresh schema whose throttle reads clock.
func newClockedStore(t testing.TB, clock *testClock) *store {
	t.Helper()
	st := newTestStore(t)
	st.now = clock
	return st
}

func countAuthFailure(t *testing.T, st *store, email, client string) time.Duration {
	t.Helper()
	wait, err := st.CountAuthFailure(context.Background(), email, client)
	if err != nil {
		t.Fatalf("CountAuthFailure(%q, %q): %v", email, client, err)
	}
	return wait
}

func TestConcurrentAuthFailuresAreCountedExactly(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	databaseURL, _ := newSchema(t) // two replicas on one database
	replicas := []*store{newStoreAt(t, databaseURL), newStoreAt(t, databaseURL)}
	replicas[0].now, replicas[1].now = clock, clock
	// run makes 40 attempts at once and returns how many waited how long (0: counted).
	run := func(email string, clients int) map[time.Duration]int {
		waits := map[time.Duration]int{}
		for _, wait := range concurrently(40, func(i int) time.Duration {
			wait, err := replicas[i%2].CountAuthFailure(context.Background(), email, fmt.Sprintf("192.0.2.%d", i%clients))
			if err != nil {
				t.Errorf("CountAuthFailure: %v", err)
			}
			return wait
		}) {
			waits[wait]++
		}
		return waits
	}
	// At one instant only the five free attempts count; the rest wait the first wait.
	if waits := run("ann@example.com", 1); waits[0] != 5 || waits[time.Second] != 35 {
		t.Errorf("40 attempts at once: waits %v; want 5 counted and 35 told to wait 1s", waits)
	}
	clock.advance(time.Second)
	if waits := run("ann@example.com", 1); waits[0] != 1 || waits[2*time.Second] != 39 {
		t.Errorf("40 attempts at once after 1s: waits %v; want 1 counted and 39 told to wait 2s", waits)
	}
	// From 40 clients, three times, another address's failures stop at its cap of 100.
	counted := 0
	for range 3 {
		counted += run("bob@example.com", 40)[0]
		clock.advance(time.Second)
	}
	if n := countRows(t, replicas[0], "sign_in_failures"); counted != 100 || n != 6+100 {
		t.Errorf("120 attempts from 40 clients: %d counted, %d stored in all; want 100, and 6 before", counted, n)
	}
}

func TestAuthFailuresAreForgottenAfterADay(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	st := newClockedStore(t, clock)
	// A flood of 26 addresses, each failing once, then five failures of ann's.
	for i := range 31 {
		countAuthFailure(t, st, []string{fmt.Sprintf("flood%d@example.com", i), "ann@example.com"}[i/26], "192.0.2.2")
	}
	clock.advance(24*time.Hour - time.Microsecond)
	countAuthFailure(t, st, "ann@example.com", "192.0.2.2")
	if r := countRows(t, st, "sign_in_failures"); r != 32 {
		t.Fatalf("a moment before a day passed: %d rows; want all 32 kept", r)
	}
	// Then each counted failure deletes up to ten forgotten rows, so the
	// table keeps only the last day's failures, which alone count.
	clock.advance(time.Microsecond)
	if wait, err := st.AuthWait(context.Background(), "ann@example.com", "192.0.2.2"); err != nil || wait != 0 {
		t.Errorf("AuthWait a day after 5 of 6 failures = %v, %v; want 0", wait, err)
	}
	for i, want := range []int{23, 14, 5, 5} {
		countAuthFailure(t, st, fmt.Sprintf("new%d@example.com", i), "192.0.2.3")
		if r := countRows(t, st, "sign_in_failures"); r != want {
			t.Errorf("a day after the flood, after failure %d of new addresses: %d rows, want %d", i+1, r, want)
		}
	}
}

func TestClientAddr(t *testing.T) {
	t.Parallel()
	trusted, _ := parseCIDRs("10.0.0.0/8, 192.0.2.7")
	for _, tt := range []struct{ remote, xff, want string }{ // xff: header lines, split at |
		{"192.0.2.1:5", "", "192.0.2.1"},
		{"192.0.2.1:5", "198.51.100.9", "192.0.2.1"}, // an untrusted peer's header is ignored
		{"10.1.2.3:5", "", "10.1.2.3"},
		{"10.1.2.3:5", "198.51.100.9", "198.51.100.9"},
		{"10.1.2.3:5", "203.0.113.5, 198.51.100.9, 10.0.0.2", "198.51.100.9"}, // the right-most untrusted
		{"10.1.2.3:5", "203.0.113.5|198.51.100.9", "198.51.100.9"},            // over two lines
		{"192.0.2.7:5", "10.0.0.1,10.0.0.2", "10.0.0.1"},                      // all trusted
		{"10.1.2.3:5", "junk, 10.0.0.2", "10.0.0.2"},                          // not an address: its sender
		{"[::ffff:10.1.2.3]:5", "::ffff:198.51.100.9", "198.51.100.9"},
		{"10.1.2.3:5", "198.51.100.9:4711", "198.51.100.9"}, // with a port
		{"10.1.2.3:5", "[2001:db8::1]:80", "2001:db8::1"},
	} {
		r := httptest.NewRequest("GET", "/", nil)
		r.RemoteAddr = tt.remote
		if tt.xff != "" {
			r.Header["X-Forwarded-For"] = strings.Split(tt.xff, "|")
		}
		if got := clientAddr(r, trusted).String(); got != tt.want {
			t.Errorf("clientAddr from %s, X-Forwarded-For %q = %s, want %s", tt.remote, tt.xff, got, tt.want)
		}
	}
	for addr, want := range map[string]string{"192.0.2.1": "192.0.2.1", "2001:db8::1": "2001:db8::/64"} {
		if got := clientKey(netip.MustParseAddr(addr)); got != want {
			t.Errorf("clientKey(%s) = %s, want %s", addr, got, want)
		}
	}
	for _, bad := range []string{"10.0.0.0/33", "proxy", "10.0.0.1,", "10.0.0.0/8;192.0.2.0/24"} {
		if _, err := parseCIDRs(bad); err == nil {
			t.Errorf("parseCIDRs(%q) = nil error, want one", bad)
		}
	}
}

// newThrottleEnv serves ann@example.com on a clocked store behind 127.0.0.10.
func newThrottleEnv(t *testing.T) (*testEnv, *testClock, userJSON) {
	clock := newTestClock()
	trusted, _ := parseCIDRs("127.0.0.10")
	e := newTestEnv(t, withStore(newClockedStore(t, clock)),
		withOptions(serverOptions{maxStreams: defaultMaxStreams, trustedProxies: trusted}))
	return e, clock, e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
}

// TestThrottleIsPerClient checks each client's own schedule, and the caps:
// 100 failures a day per address (sparing familiar clients), 100 an hour per client.
func TestThrottleIsPerClient(t *testing.T) {
	t.Parallel()
	e, clock, _ := newThrottleEnv(t)
	stranger, owner, proxy := e.from("127.0.0.2"), e.from("127.0.0.3"), e.from("127.0.0.10")
	for range 5 {
		mustWrongCredentials(t, stranger.authenticate("ann@example.com", "wrong-password"))
	}
	mustThrottled(t, stranger.authenticate("ann@example.com", "passw0rd-1"), 1)
	mustUser(t, owner.authenticate("ann@example.com", "passw0rd-1"), http.StatusOK)
	// Through the trusted proxy, X-Forwarded-For names the client; from
	// anyone else it is ignored, and so cannot escape a wait.
	body := authBody("ann@example.com", "passw0rd-1")
	mustThrottled(t, proxy.do("POST", "/users/authenticate", body, "X-Forwarded-For: 127.0.0.3, 127.0.0.2"), 1)
	mustUser(t, proxy.do("POST", "/users/authenticate", body, "X-Forwarded-For: 127.0.0.2, 127.0.0.3"), http.StatusOK)
	mustThrottled(t, stranger.do("POST", "/users/authenticate", body, "X-Forwarded-For: 127.0.0.3"), 1)
	if logs := e.logs.String(); strings.Contains(logs, "client=127.0.0.10") || !strings.Contains(logs, "client=127.0.0.3") {
		t.Errorf("access log names the proxy, or not the client behind it:\n%s", logs)
	}
	// One client may fail 100 times an hour, for any addresses.
	newcomer, sprayer := e.from("127.0.0.4"), e.from("127.0.0.5")
	for i := range 100 {
		mustWrongCredentials(t, sprayer.authenticate(fmt.Sprintf("user%d@example.com", i), "passw0rd-1"))
	}
	mustThrottled(t, sprayer.authenticate("ann@example.com", "passw0rd-1"), 3600)
	mustUser(t, newcomer.authenticate("ann@example.com", "passw0rd-1"), http.StatusOK)
	clock.advance(time.Hour)
	mustUser(t, sprayer.authenticate("ann@example.com", "passw0rd-1"), http.StatusOK)
	// A day later, 100 failures, 5 from each of 20 clients, for ann and for nobody.
	clock.advance(24 * time.Hour)
	for _, email := range []string{"ann@example.com", "nobody@example.com"} {
		for i := range 100 {
			mustWrongCredentials(t, e.from(fmt.Sprintf("127.0.1.%d", i/5)).authenticate(email, "wrong-password"))
		}
		mustThrottled(t, e.from("127.0.0.6").authenticate(email, "passw0rd-1"), 86400)
	}
	// The owner's client signed in lately: only its own schedule holds it.
	mustWrongCredentials(t, owner.authenticate("ann@example.com", "wrong-password"))
	mustUser(t, owner.authenticate("ann@example.com", "passw0rd-1"), http.StatusOK)
	clock.advance(24 * time.Hour)
	mustUser(t, e.from("127.0.0.6").authenticate("ann@example.com", "passw0rd-1"), http.StatusOK)
	// A client is familiar for 30 days after its last success.
	clock.advance(30 * 24 * time.Hour)
	for i := range 100 {
		countAuthFailure(t, e.store, "ann@example.com", fmt.Sprintf("192.0.2.%d", i))
	}
	mustThrottled(t, owner.authenticate("ann@example.com", "passw0rd-1"), 86400)
}

func TestAccountChangesForgetFailures(t *testing.T) {
	t.Parallel()
	e, _, u := newThrottleEnv(t)
	stranger, path := e.from("127.0.0.2"), fmt.Sprintf("/users/%d", u.ID)
	mustUser(t, e.authenticate("ann@example.com", "passw0rd-1"), http.StatusOK)
	// lockOut fails five times from a stranger, free if nothing was counted.
	lockOut := func(email string) {
		t.Helper()
		for range 5 {
			mustWrongCredentials(t, stranger.authenticate(email, "wrong-password"))
		}
		mustThrottled(t, stranger.authenticate(email, "wrong-password"), 1)
	}
	lockOut("ann@example.com")
	mustUser(t, e.do("PUT", path, `{"first_name":"Anna"}`), http.StatusOK)
	mustThrottled(t, stranger.authenticate("ann@example.com", "wrong-password"), 1)
	mustUser(t, e.do("PUT", path, `{"password":"passw0rd-2"}`), http.StatusOK)
	lockOut("ann@example.com")
	if r := e.do("DELETE", path, ""); r.status != http.StatusNoContent {
		t.Fatalf("%s, want 204", r)
	}
	if f, c := countRows(t, e.store, "sign_in_failures"), countRows(t, e.store, "sign_in_clients"); f != 0 || c != 0 {
		t.Errorf("after DELETE: %d failures, %d familiar clients stored; want none", f, c)
	}
	// Failures against an address are forgotten when a user gets it, created or moved.
	lockOut("ann@example.com")
	ann := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-3")
	mustWrongCredentials(t, stranger.authenticate("ann@example.com", "wrong-password"))
	lockOut("cy@example.com")
	mustUser(t, e.do("PUT", fmt.Sprintf("/users/%d", ann.ID), `{"email":"cy@example.com"}`), http.StatusOK)
	mustWrongCredentials(t, stranger.authenticate("cy@example.com", "wrong-password"))
}

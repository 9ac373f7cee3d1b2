package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func TestAPIToken(t *testing.T) {
	t.Parallel()
	const token = "tok-3f9a"
	e := newTestEnv(t, withToken(token))
	requests := []struct{ method, path, body string }{
		{"POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "password1")},
		{"POST", "/users", userBody("Ann", "Lee", "ann@example.com", "password1")},
		{"GET", "/users/", ""},
		{"GET", "/users", ""},
		{"GET", "/users/1", ""},
		{"PUT", "/users/1", `{"first_name":"Bob"}`},
		{"DELETE", "/users/1", ""},
	}
	for _, auth := range []string{"", "Bearer", "Bearer ", "Bearer wrong", "Bearer " + token + "x", "Basic " + token, token, "Bearer  " + token} {
		for _, rq := range requests {
			var header []string
			if auth != "" {
				header = []string{"Authorization: " + auth}
			}
			r := e.do(rq.method, rq.path, rq.body, header...)
			mustError(t, r, http.StatusUnauthorized, "Not authenticated")
			if got := r.header.Get("WWW-Authenticate"); got != "Bearer" {
				t.Errorf("%s with %q: WWW-Authenticate = %q, want Bearer", r.what, auth, got)
			}
		}
	}
	if n := countUsers(t, e.store); n != 0 {
		t.Fatalf("%d users created without the token", n)
	}

	u := mustUser(t, e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "password1"), "Authorization: Bearer "+token), http.StatusCreated)
	mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), "", "Authorization: bearer "+token), http.StatusOK)
	if r := e.do("GET", "/healthz", ""); r.status != http.StatusOK {
		t.Errorf("%s without a token, want 200: /healthz stays open", r)
	}
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

func countUsers(t *testing.T, st *store) int {
	t.Helper()
	var n int
	if err := st.db.QueryRow(`SELECT count(*) FROM users`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// gatedHasher returns a hasher whose hashes wait for release to be closed,
// and counts how many run at once.
func gatedHasher(concurrency int, maxWait time.Duration) (h *hasher, active, peak *atomic.Int32, release chan struct{}) {
	h = newHasher(bcrypt.MinCost, concurrency, maxWait)
	active, peak = new(atomic.Int32), new(atomic.Int32)
	release = make(chan struct{})
	h.generate = func(password []byte, cost int) ([]byte, error) {
		n := active.Add(1)
		defer active.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		<-release
		return bcrypt.GenerateFromPassword(password, cost)
	}
	return h, active, peak, release
}

func TestHashingIsBounded(t *testing.T) {
	t.Parallel()
	const bound, creates = 2, 8
	h, active, peak, release := gatedHasher(bound, time.Minute)
	e := newTestEnv(t, withHasher(h))

	var wg sync.WaitGroup
	results := make(chan response, creates)
	for i := 0; i < creates; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results <- e.do("POST", "/users/", userBody("Ann", "Lee", fmt.Sprintf("u%d@example.com", i), "password1"))
		}(i)
	}
	// Wait until the slots are full, give the others every chance to get
	// past the bound, then let the hashes finish.
	for active.Load() < bound {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	close(release)
	wg.Wait()
	close(results)
	for r := range results {
		if r.status != http.StatusCreated {
			t.Errorf("%s, want 201", r)
		}
	}
	if p := peak.Load(); p != bound {
		t.Errorf("at most %d hashes ran at once, want the bound %d", p, bound)
	}
	// Reads are not held up by the hashing queue.
	mustList(t, e.do("GET", "/users/", ""))
}

func TestHashingBusyAnswers503(t *testing.T) {
	t.Parallel()
	h, active, _, release := gatedHasher(1, 50*time.Millisecond)
	e := newTestEnv(t, withHasher(h))
	first := make(chan response, 1)
	go func() { first <- e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "password1")) }()
	for active.Load() < 1 {
		time.Sleep(time.Millisecond)
	}
	for _, rq := range []struct{ method, path, body string }{
		{"POST", "/users/", userBody("Bob", "Ray", "bob@example.com", "password1")},
		{"PUT", "/users/1", `{"password":"password2"}`},
	} {
		r := e.do(rq.method, rq.path, rq.body)
		mustError(t, r, http.StatusServiceUnavailable, "Service unavailable")
		if r.header.Get("Retry-After") == "" {
			t.Errorf("%s: no Retry-After", r.what)
		}
	}
	// Requests that need no hash are served meanwhile.
	mustError(t, e.do("GET", "/users/", ""), http.StatusNotFound, "No users found")
	close(release)
	mustUser(t, <-first, http.StatusCreated)
	if n := countUsers(t, e.store); n != 1 {
		t.Errorf("%d users stored, want only the first", n)
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

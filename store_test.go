package main

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
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

package main

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func TestHasherMatches(t *testing.T) {
	t.Parallel()
	h := newHasher(bcrypt.MinCost, 1, time.Second)
	long := strings.Repeat("p", maxPasswordBytes)
	hashOf := func(password string) string {
		b, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	stored, storedLong := hashOf("password1"), hashOf(long)
	for _, tt := range []struct {
		name, stored, password string
		want                   bool
	}{
		{"right password", stored, "password1", true},
		{"wrong password", stored, "password2", false},
		{"empty password", stored, "", false},
		{"72 bytes, right", storedLong, long, true},
		// bcrypt reads 72 bytes: this one would match if it were cut short.
		{"over 72 bytes, first 72 right", storedLong, long + "x", false},
		{"no such user", "", "password1", false},
		{"not a bcrypt hash", "x", "password1", false},
	} {
		if got := h.matches(tt.stored, tt.password); got != tt.want {
			t.Errorf("%s: matches = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestDummyHashIsAtTheConfiguredCost(t *testing.T) {
	t.Parallel()
	for _, cost := range []int{bcrypt.MinCost, bcrypt.MinCost + 1} {
		h := newHasher(cost, 1, time.Second)
		if got, err := bcrypt.Cost(h.dummy); err != nil || got != cost {
			t.Errorf("dummy hash of a hasher at cost %d: cost %d (%v)", cost, got, err)
		}
	}
	if a, b := newHasher(bcrypt.MinCost, 1, time.Second), newHasher(bcrypt.MinCost, 1, time.Second); string(a.dummy) == string(b.dummy) {
		t.Error("two hashers made the same dummy hash, want a random password each")
	}
}

func TestHasherOutdated(t *testing.T) {
	t.Parallel()
	h := newHasher(bcrypt.MinCost+1, 1, time.Second)
	for _, tt := range []struct {
		cost int
		want bool
	}{{bcrypt.MinCost, true}, {bcrypt.MinCost + 1, false}, {bcrypt.MinCost + 2, true}} {
		b, _ := bcrypt.GenerateFromPassword([]byte("password1"), tt.cost)
		if got := h.outdated(string(b)); got != tt.want {
			t.Errorf("outdated(hash at cost %d) with the hasher at %d = %v, want %v", tt.cost, h.cost, got, tt.want)
		}
	}
	if h.outdated("x") {
		t.Error(`outdated("x") = true, want false: what is not a hash is not rehashed`)
	}
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

package main

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func TestHasherReadsStoredHashes(t *testing.T) {
	t.Parallel()
	h := newHasher(bcrypt.MinCost+2, 1, time.Second)
	if cost, err := bcrypt.Cost(h.dummy); err != nil || cost != h.cost || string(h.dummy) == string(newHasher(h.cost, 1, 0).dummy) {
		t.Errorf("dummy hash: cost %d (%v), want the hasher's %d, of a random password each", cost, err, h.cost)
	}
	// Each check is padded to one comparison at the hasher's cost.
	var costs []int
	compare, generate := h.compare, h.generate
	h.compare = func(hash, password []byte) error {
		cost, _ := bcrypt.Cost(hash)
		costs = append(costs, cost)
		return compare(hash, password)
	}
	h.generate = func(password []byte, cost int) ([]byte, error) {
		costs = append(costs, cost)
		return generate(password, cost)
	}
	long := strings.Repeat("p", maxPasswordBytes)
	hashOf := func(password string, cost int) string {
		b, _ := bcrypt.GenerateFromPassword([]byte(password), cost) // fails only on a cost out of range
		return string(b)
	}
	c := h.cost
	for _, tt := range []struct {
		name, stored, password string
		matches, outdated      bool
		costs                  []int // of the comparison, then of the padding
	}{
		{"right password", hashOf("password1", c), "password1", true, false, []int{c}},
		{"wrong password", hashOf("password1", c), "password2", false, false, []int{c}},
		{"empty password", hashOf("password1", c), "", false, false, []int{c}},
		{"72 bytes, right", hashOf(long, c), long, true, false, []int{c}},
		// bcrypt reads 72 bytes: this one would match if it were cut short.
		{"over 72 bytes, first 72 right", hashOf(long, c), long + "x", false, false, []int{c}},
		{"no such user", "", "password1", false, false, []int{c}},
		{"not a bcrypt hash", "x", "password1", false, false, []int{0}},
		{"hash two steps cheaper", hashOf("password1", c-2), "password1", true, true, []int{c - 2, c - 2, c - 1}},
		{"hash at a higher cost", hashOf("password1", c+1), "password1", true, true, []int{c + 1}},
	} {
		costs = nil
		if got := h.matches(tt.stored, tt.password); got != tt.matches || !slices.Equal(costs, tt.costs) {
			t.Errorf("%s: matches = %v at costs %v, want %v at %v", tt.name, got, costs, tt.matches, tt.costs)
		}
		if got := h.outdated(tt.stored); got != tt.outdated {
			t.Errorf("%s: outdated, with the hasher at cost %d = %v, want %v", tt.name, c, got, tt.outdated)
		}
	}
}

// gatedHasher returns a hasher whose hashes at its cost (not the padding of
// checks) wait for release to be closed, and counts how many run at once.
func gatedHasher(concurrency int, maxWait time.Duration) (h *hasher, active, peak *atomic.Int32, release chan struct{}) {
	h = newHasher(bcrypt.MinCost, concurrency, maxWait)
	active, peak = new(atomic.Int32), new(atomic.Int32)
	release = make(chan struct{})
	h.generate = func(password []byte, cost int) ([]byte, error) {
		if cost == h.cost {
			n := active.Add(1)
			defer active.Add(-1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
			<-release
		}
		return bcrypt.GenerateFromPassword(password, cost)
	}
	return h, active, peak, release
}

func TestHashingIsBoundedAndGivesUpWhenBusy(t *testing.T) {
	t.Parallel()
	const bound = 2
	h, active, _, release := gatedHasher(bound, 50*time.Millisecond)
	t.Cleanup(func() { close(release) })
	results := make(chan error, bound+1)
	// From as many clients: one may hold only its share of the slots.
	for _, client := range []string{"a", "b", "another"} {
		if client == "another" {
			waitUntil(t, "every hashing slot taken", func() bool { return active.Load() == bound })
		}
		go func() { _, err := h.hash(context.Background(), client, "password1"); results <- err }()
	}
	// The last waits maxWait for a slot and gives up without hashing: had it
	// passed the bound, it would wait for release instead.
	select {
	case err := <-results:
		if !errors.Is(err, errBusy) {
			t.Errorf("hash with all %d slots taken: err = %v, want errBusy", bound, err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("hash with all %d slots taken: no answer within 30s; %d hashes running", bound, active.Load())
	}
}

package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func TestHasherReadsStoredHashes(t *testing.T) {
	t.Parallel()
	h := newHasher(bcrypt.MinCost+1, 1, time.Second)
	long := strings.Repeat("p", maxPasswordBytes)
	hashOf := func(password string, cost int) string {
		b, _ := bcrypt.GenerateFromPassword([]byte(password), cost) // fails only on a cost out of range
		return string(b)
	}
	stored, storedLong := hashOf("password1", h.cost), hashOf(long, h.cost)
	for _, tt := range []struct {
		name, stored, password string
		matches, outdated      bool
	}{
		{"right password", stored, "password1", true, false},
		{"wrong password", stored, "password2", false, false},
		{"empty password", stored, "", false, false},
		{"72 bytes, right", storedLong, long, true, false},
		// bcrypt reads 72 bytes: this one would match if it were cut short.
		{"over 72 bytes, first 72 right", storedLong, long + "x", false, false},
		{"no such user", "", "password1", false, false},
		{"not a bcrypt hash", "x", "password1", false, false},
		{"hash at a lower cost", hashOf("password1", h.cost-1), "password1", true, true},
		{"hash at a higher cost", hashOf("password1", h.cost+1), "password1", true, true},
	} {
		if got := h.matches(tt.stored, tt.password); got != tt.matches {
			t.Errorf("%s: matches = %v, want %v", tt.name, got, tt.matches)
		}
		if got := h.outdated(tt.stored); got != tt.outdated {
			t.Errorf("%s: outdated, with the hasher at cost %d = %v, want %v", tt.name, h.cost, got, tt.outdated)
		}
	}
}

func TestDummyHashIsAtTheConfiguredCost(t *testing.T) {
	t.Parallel()
	// An unknown address is checked against the dummy hash: at the hasher's
	// cost, so that it takes as long as a wrong password, of a random one.
	a, b := newHasher(bcrypt.MinCost+1, 1, time.Second), newHasher(bcrypt.MinCost+1, 1, time.Second)
	if cost, err := bcrypt.Cost(a.dummy); err != nil || cost != a.cost {
		t.Errorf("dummy hash of a hasher at cost %d: cost %d (%v)", a.cost, cost, err)
	}
	if string(a.dummy) == string(b.dummy) {
		t.Error("two hashers made the same dummy hash, want a random password each")
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

func TestHashingIsBoundedAndGivesUpWhenBusy(t *testing.T) {
	t.Parallel()
	const bound = 2
	h, active, _, release := gatedHasher(bound, 50*time.Millisecond)
	results := make(chan error, bound+1)
	// From as many clients: one may hold only its share of the slots.
	hash := func(client string) { _, err := h.hash(context.Background(), client, "password1"); results <- err }
	for i := range bound {
		go hash(fmt.Sprint(i))
	}
	t.Cleanup(func() { close(release) })
	waitUntil(t, "every hashing slot taken", func() bool { return active.Load() == bound })
	// One more waits maxWait for a slot, and gives up without hashing: had
	// it passed the bound, it would wait for release instead.
	go hash("another")
	select {
	case err := <-results:
		if !errors.Is(err, errBusy) {
			t.Errorf("hash with all %d slots taken: err = %v, want errBusy", bound, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("hash with all %d slots taken: no answer within 10s; %d hashes running", bound, active.Load())
	}
}

// A check of a hash made before BCRYPT_COST was raised is padded with one
// comparison at each cost up to the hasher's: as bcrypt's time doubles with
// each step, it then takes as long as a check of an unknown address, and
// timing cannot tell who has an account.
func TestChecksOfOlderHashesArePadded(t *testing.T) {
	t.Parallel()
	h := newHasher(bcrypt.MinCost+3, 1, time.Second)
	var costs []int
	compare := h.compare
	h.compare = func(hash, password []byte) error {
		cost, _ := bcrypt.Cost(hash)
		costs = append(costs, cost)
		return compare(hash, password)
	}
	for _, tt := range []struct {
		name   string
		stored int // cost of the stored hash; 0: no such user
		want   []int
	}{
		{"no such user", 0, []int{h.cost}},
		{"hash at the hasher's cost", h.cost, []int{h.cost}},
		{"hash two steps cheaper", h.cost - 2, []int{h.cost - 2, h.cost - 2, h.cost - 1}},
		{"hash at a higher cost", h.cost + 1, []int{h.cost + 1}},
	} {
		stored := ""
		if tt.stored > 0 {
			b, _ := bcrypt.GenerateFromPassword([]byte("password1"), tt.stored)
			stored = string(b)
		}
		costs = nil
		if !h.matches(stored, "password1") && tt.stored > 0 {
			t.Errorf("%s: the right password does not match", tt.name)
		}
		if !slices.Equal(costs, tt.want) {
			t.Errorf("%s: compared at costs %v, want %v", tt.name, costs, tt.want)
		}
	}
}

package main

import (
	"context"
	"crypto/rand"
	"errors"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

var (
	errBusy  = errors.New("password hashing is busy")                   // every slot stayed taken for the wait
	errShare = errors.New("client holds its share of password hashing") // held or waited for already
)

const (
	bcryptSaltLen    = 29 // the length of a bcrypt hash's "$2a$12$" + salt prefix
	maxPasswordBytes = 72 // as much of a password as bcrypt reads
)

// hasher hashes passwords with bcrypt, at most cap(slots) at once, each
// waiting at most maxWait for a slot, so that a flood cannot take every
// core. One client may hold or wait for half the slots (rounded up).
type hasher struct {
	cost     int
	slots    chan struct{}
	maxWait  time.Duration
	mu       sync.Mutex
	clients  map[string]int                                  // slots each client holds or waits for
	generate func(password []byte, cost int) ([]byte, error) // bcrypt's; tests wrap it
	compare  func(hash, password []byte) error               // bcrypt's; tests wrap it
	dummy    []byte                                          // a hash at cost of a random password: the unknown address's
}

// newHasher returns a hasher at cost, running concurrency hashes at most.
func newHasher(cost, concurrency int, maxWait time.Duration) *hasher {
	dummy, err := bcrypt.GenerateFromPassword([]byte(rand.Text()), cost)
	if err != nil {
		panic(err) // a short password at a valid cost always hashes
	}
	return &hasher{
		cost:     cost,
		slots:    make(chan struct{}, concurrency),
		maxWait:  maxWait,
		clients:  make(map[string]int),
		generate: bcrypt.GenerateFromPassword,
		compare:  bcrypt.CompareHashAndPassword,
		dummy:    dummy,
	}
}

// passwordHash is a bcrypt hash and its salt, the "$2a$cc$" + salt prefix.
type passwordHash struct{ hash, salt string }

// hash returns the bcrypt hash of password, for client, or acquire's error.
func (h *hasher) hash(ctx context.Context, client, password string) (passwordHash, error) {
	release, err := h.acquire(ctx, client)
	if err != nil {
		return passwordHash{}, err
	}
	defer release()
	return h.hashHeld(password)
}

// hashHeld is hash for a caller that holds a slot.
func (h *hasher) hashHeld(password string) (passwordHash, error) {
	b, err := h.generate([]byte(password), h.cost)
	if err != nil {
		return passwordHash{}, err
	}
	return passwordHash{string(b), string(b[:bcryptSaltLen])}, nil
}

// matches reports whether the stored hash is of password, for a caller that
// holds a slot. Each call does a check's work at the hasher's cost: stored
// empty (no such user) is checked against the dummy, a password over 72
// bytes cut short and refused, and a lower cost padded up to the hasher's.
func (h *hasher) matches(stored, password string) bool {
	hash, pw := []byte(stored), []byte(password)[:min(len(password), maxPasswordBytes)]
	if stored == "" {
		hash = h.dummy
	}
	err := h.compare(hash, pw)
	if cost, costErr := bcrypt.Cost(hash); costErr == nil {
		for ; cost < h.cost; cost++ {
			h.generate(pw, cost)
		}
	}
	return err == nil && stored != "" && len(password) <= maxPasswordBytes
}

// outdated reports whether a stored hash is at another cost than the hasher's.
func (h *hasher) outdated(stored string) bool {
	cost, err := bcrypt.Cost([]byte(stored))
	return err == nil && cost != h.cost
}

// acquire takes a hashing slot for client, given back by release. It returns
// errShare at once if client holds or waits for its share, errBusy if no
// slot frees up within maxWait, and ctx's error if ctx ends first.
func (h *hasher) acquire(ctx context.Context, client string) (release func(), err error) {
	if !h.share(client, 1) {
		return nil, errShare
	}
	wait := time.NewTimer(h.maxWait)
	defer wait.Stop()
	select {
	case h.slots <- struct{}{}:
		return func() { <-h.slots; h.share(client, -1) }, nil
	case <-wait.C:
		err = errBusy
	case <-ctx.Done():
		err = ctx.Err()
	}
	h.share(client, -1)
	return nil, err
}

// share adds d to the slots client holds or waits for, unless that would
// pass half the slots (rounded up), and reports whether it did.
func (h *hasher) share(client string, d int) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := h.clients[client] + d
	if n > (cap(h.slots)+1)/2 {
		return false
	}
	h.clients[client] = n
	if n == 0 {
		delete(h.clients, client)
	}
	return true
}

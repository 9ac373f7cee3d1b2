package main

import (
	"context"
	"crypto/rand"
	"errors"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// errBusy means every hashing slot stayed taken for the whole wait, and
// errShare that the client already holds or waits for its share of them.
var (
	errBusy  = errors.New("password hashing is busy")
	errShare = errors.New("client holds its share of password hashing")
)

// bcryptSaltLen is the length of a bcrypt hash's "$2a$12$" + salt prefix.
const bcryptSaltLen = 29

// maxPasswordBytes is as much of a password as bcrypt reads.
const maxPasswordBytes = 72

// hasher hashes passwords with bcrypt. A hash takes a core for a long time
// on purpose, so at most cap(slots) run at once and a request waits at most
// maxWait for a slot: a flood of creates cannot take every core and starve
// the other requests. One client may hold or wait for at most half the
// slots (rounded up), so that it cannot keep the others from hashing.
type hasher struct {
	cost    int
	slots   chan struct{}
	maxWait time.Duration
	mu      sync.Mutex
	clients map[string]int // slots each client holds or waits for
	// generate and compare are bcrypt.GenerateFromPassword and
	// bcrypt.CompareHashAndPassword; tests wrap them to watch what is done.
	generate func(password []byte, cost int) ([]byte, error)
	compare  func(hash, password []byte) error
	// dummy is a hash at cost of a random password, made at start. A check
	// for an address no user has compares with it, so that it takes as long
	// as a check of a wrong password.
	dummy []byte
	// padding[c] is a hash at cost c of a random password, made when first
	// needed, to pad checks of hashes made at a lower cost (see matches).
	padding [bcrypt.MaxCost + 1]struct {
		once sync.Once
		hash []byte
	}
}

// newHasher returns a hasher that hashes at cost, running at most
// concurrency hashes at once.
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

// passwordHash is a bcrypt hash and the salt bcrypt generated for it: the
// hash's "$2a$cc$" prefix and the 22 characters that follow.
type passwordHash struct{ hash, salt string }

// hash returns the bcrypt hash of password, for client. It returns the
// errors of acquire.
func (h *hasher) hash(ctx context.Context, client, password string) (passwordHash, error) {
	release, err := h.acquire(ctx, client)
	if err != nil {
		return passwordHash{}, err
	}
	defer release()
	return h.hashHeld(password)
}

// acquire takes a hashing slot for client, which the caller must give back
// by calling release. It returns errShare at once if client holds or waits
// for its share already, errBusy if no slot frees up within maxWait, and
// ctx's error if ctx ends first.
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
	switch {
	case n > (cap(h.slots)+1)/2:
		return false
	case n == 0:
		delete(h.clients, client)
	default:
		h.clients[client] = n
	}
	return true
}

// hashHeld is hash for a caller that holds a slot.
func (h *hasher) hashHeld(password string) (passwordHash, error) {
	b, err := h.generate([]byte(password), h.cost)
	if err != nil {
		return passwordHash{}, err
	}
	return passwordHash{string(b), string(b[:bcryptSaltLen])}, nil
}

// matches reports whether password is the one that the stored hash was made
// from, for a caller that holds a slot. Every call does one bcrypt
// comparison, even when it cannot match: with stored empty (no such user)
// it compares with the dummy hash, and a password longer than bcrypt reads
// is compared cut short and then refused.
func (h *hasher) matches(stored, password string) bool {
	hash, pw := []byte(stored), []byte(password)
	if stored == "" {
		hash = h.dummy
	}
	if len(pw) > maxPasswordBytes {
		pw = pw[:maxPasswordBytes]
	}
	err := h.compare(hash, pw)
	// A hash made before BCRYPT_COST was raised compares faster than the
	// dummy does, which would tell who has an account. bcrypt's time
	// doubles with each step of cost, so one comparison at each cost from
	// the stored one up to the hasher's makes up the difference exactly.
	if cost, costErr := bcrypt.Cost(hash); costErr == nil {
		for ; cost < h.cost; cost++ {
			h.compare(h.paddingAt(cost), pw)
		}
	}
	return err == nil && stored != "" && len(password) <= maxPasswordBytes
}

// paddingAt returns padding[cost], making it if it is not made yet.
func (h *hasher) paddingAt(cost int) []byte {
	p := &h.padding[cost]
	p.once.Do(func() {
		p.hash, _ = bcrypt.GenerateFromPassword([]byte(rand.Text()), cost)
	})
	return p.hash
}

// outdated reports whether a stored hash was made at a cost other than the
// hasher's.
func (h *hasher) outdated(stored string) bool {
	cost, err := bcrypt.Cost([]byte(stored))
	return err == nil && cost != h.cost
}

package main

import (
	"context"
	"errors"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// errBusy means every hashing slot stayed taken for the whole wait.
var errBusy = errors.New("password hashing is busy")

// bcryptSaltLen is the length of a bcrypt hash's "$2a$12$" + salt prefix.
const bcryptSaltLen = 29

// hasher hashes passwords with bcrypt. A hash takes a core for a long time
// on purpose, so at most cap(slots) run at once and a request waits at most
// maxWait for a slot: a flood of creates cannot take every core and starve
// the other requests.
type hasher struct {
	cost    int
	slots   chan struct{}
	maxWait time.Duration
	// generate is bcrypt.GenerateFromPassword; tests wrap it to watch the
	// concurrency bound.
	generate func(password []byte, cost int) ([]byte, error)
}

// newHasher returns a hasher that hashes at cost, running at most
// concurrency hashes at once.
func newHasher(cost, concurrency int, maxWait time.Duration) *hasher {
	return &hasher{
		cost:     cost,
		slots:    make(chan struct{}, concurrency),
		maxWait:  maxWait,
		generate: bcrypt.GenerateFromPassword,
	}
}

// hash returns the bcrypt hash of password and the salt bcrypt generated
// for it, which is the hash's prefix. It returns errBusy if no slot frees up
// within maxWait, and ctx's error if ctx ends first.
func (h *hasher) hash(ctx context.Context, password string) (hash, salt string, err error) {
	wait := time.NewTimer(h.maxWait)
	defer wait.Stop()
	select {
	case h.slots <- struct{}{}:
	case <-wait.C:
		return "", "", errBusy
	case <-ctx.Done():
		return "", "", ctx.Err()
	}
	defer func() { <-h.slots }()

	b, err := h.generate([]byte(password), h.cost)
	if err != nil {
		return "", "", err
	}
	hash = string(b)
	return hash, hash[:bcryptSaltLen], nil
}

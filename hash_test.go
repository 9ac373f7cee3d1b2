package main

import (
	"strings"
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

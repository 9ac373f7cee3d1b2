package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
)

// clientAddr returns the address of the client that sent r: the TCP peer,
// or behind trusted proxies the right-most X-Forwarded-For address not one.
func clientAddr(r *http.Request, trusted []netip.Prefix) netip.Addr {
	peer, _ := netip.ParseAddrPort(r.RemoteAddr)
	addr := peer.Addr().Unmap()
	hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
	for i := len(hops) - 1; i >= 0 && slices.ContainsFunc(trusted, func(p netip.Prefix) bool { return p.Contains(addr) }); i-- {
		hop := strings.TrimSpace(hops[i])
		next, err := netip.ParseAddr(hop)
		if withPort, portErr := netip.ParseAddrPort(hop); portErr == nil {
			next, err = withPort.Addr(), nil // as some proxies write it
		}
		if err != nil {
			break // what a trusted proxy did not write: its sender is the client
		}
		addr = next.Unmap().WithZone("")
	}
	return addr
}

// clientKey is what the throttles count a client by: its address, or for
// IPv6 its /64, which one host is commonly given whole.
func clientKey(addr netip.Addr) string {
	if addr.Is6() {
		p, _ := addr.Prefix(64)
		return p.String()
	}
	return addr.String()
}

// client returns the key of the client that sent r.
func (s *server) client(r *http.Request) string { return clientKey(clientAddr(r, s.trustedProxies)) }

// parseCIDRs reads TRUSTED_PROXIES: comma-separated CIDRs or addresses.
func parseCIDRs(v string) ([]netip.Prefix, error) {
	var prefixes []netip.Prefix
	for _, f := range strings.Split(v, ",") {
		f = strings.TrimSpace(f)
		p, err := netip.ParsePrefix(f)
		if a, aErr := netip.ParseAddr(f); aErr == nil {
			p, err = a.Prefix(a.BitLen())
		}
		if err != nil {
			return nil, fmt.Errorf("must be comma-separated CIDRs such as 10.0.0.0/8, got %q", f)
		}
		prefixes = append(prefixes, p.Masked())
	}
	return prefixes, nil
}

// authenticate checks an email and password: wrong passwords and unknown
// addresses get one answer after the same work. A success rehashes if need be.
func (s *server) authenticate(w http.ResponseWriter, r *http.Request) {
	in, ok := readCredentials(w, r)
	if !ok || !s.nfc(w, r, &in.email) {
		return
	}
	client := s.client(r)
	// An early attempt is turned away before it queues for a hashing slot.
	if wait, err := s.store.AuthWait(r.Context(), in.email, client); err != nil || wait > 0 {
		s.throttled(w, r, wait, err)
		return
	}
	u, stored, err := s.store.Credentials(r.Context(), in.email)
	if err != nil && !errors.Is(err, errNotFound) {
		s.fail(w, r, err)
		return
	}
	release, err := s.hasher.acquire(r.Context(), client)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	// Counted with the slot held, so a busy hasher's 503 counts nothing, and
	// checked again, since the wait may have begun meanwhile.
	if wait, err := s.store.CountAuthFailure(r.Context(), in.email, client); err != nil || wait > 0 {
		release()
		s.throttled(w, r, wait, err)
		return
	}
	match := s.hasher.matches(stored, in.password)
	var newHash passwordHash
	if match && s.hasher.outdated(stored) {
		newHash, err = s.hasher.hashHeld(in.password)
	}
	release()
	if !match {
		writeError(w, http.StatusBadRequest, "Invalid email or password")
		return
	}
	// Recorded even if the client leaves, so a right password is never left
	// counted as a failure; if that fails, the next success tries again.
	if err = errors.Join(err, s.store.SignedIn(context.WithoutCancel(r.Context()), in.email, client, u.ID, stored, newHash)); err != nil {
		s.log(w, r).Warn("record a sign-in", "user_id", u.ID, "err", err)
	}
	encode(w, http.StatusOK, u)
}

// throttled answers a sign-in that must wait, or whose throttle failed.
func (s *server) throttled(w http.ResponseWriter, r *http.Request, wait time.Duration, err error) {
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Retry-After", strconv.Itoa(int((wait+time.Second-1)/time.Second)))
	writeError(w, http.StatusTooManyRequests, "Too many failed attempts")
}

// The throttle's queries take the normalized email as $1, the client as $2
// and store.now as $3: nil for the database's clock, shared by replicas.
const authClock = `COALESCE($3::timestamptz, now())`

// authWaitQuery returns the microseconds an attempt must still wait (NULL
// or not positive: none), the latest end of: this client's wait for this
// address (5 failures free, then 1 s doubling up to 15 minutes); the
// address's, past 100 failures in a day, for a client that has not signed in
// to it in 30 days; and this client's, past 100 failures in an hour.
const authWaitQuery = `
	SELECT (extract(epoch FROM GREATEST(
		(SELECT max(failed_at) + CASE WHEN count(*) < 5 THEN interval '0'
			ELSE LEAST(interval '1 second' * power(2, LEAST(count(*) - 5, 10)), interval '15 minutes') END
		FROM sign_in_failures
		WHERE email = $1 AND client = $2 AND failed_at > ` + authClock + ` - interval '24 hours'),
		(SELECT failed_at + interval '24 hours' FROM sign_in_failures
		WHERE email = $1 AND failed_at > ` + authClock + ` - interval '24 hours' AND NOT EXISTS (
			SELECT FROM sign_in_clients c JOIN users u ON u.id = c.user_id
			WHERE u.email = $1 AND c.client = $2 AND c.signed_in_at > ` + authClock + ` - interval '30 days')
		ORDER BY failed_at DESC OFFSET 99 LIMIT 1),
		(SELECT failed_at + interval '1 hour' FROM sign_in_failures
		WHERE client = $2 AND failed_at > ` + authClock + ` - interval '1 hour'
		ORDER BY failed_at DESC OFFSET 99 LIMIT 1)
	) - ` + authClock + `) * 1000000)::bigint`

// AuthWait returns how long client must wait to sign in as email, or 0.
func (s *store) AuthWait(ctx context.Context, email, client string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	return authWait(s.db.QueryRowContext(ctx, authWaitQuery, email, client, s.now))
}

func authWait(row *sql.Row) (time.Duration, error) {
	var micros sql.NullInt64
	err := row.Scan(&micros)
	return time.Duration(max(micros.Int64, 0)) * time.Microsecond, dbError(err)
}

// CountAuthFailure counts client's attempt as email as a failure before its
// password is checked (SignedIn undoes it), or returns its wait. Locks on
// the address, then the client, keep concurrent counts exact.
func (s *store) CountAuthFailure(ctx context.Context, email, client string) (wait time.Duration, err error) {
	err = s.write(ctx, func(ctx context.Context, conn *sql.Conn) error {
		_, err := conn.ExecContext(ctx, `SELECT pg_advisory_xact_lock(1, hashtext($1)), pg_advisory_xact_lock(2, hashtext($2))`, email, client)
		if err != nil {
			return err
		}
		if wait, err = authWait(conn.QueryRowContext(ctx, authWaitQuery, email, client, s.now)); err != nil || wait > 0 {
			return err
		}
		// Up to ten failures a day old go too, so the table holds a day's.
		_, err = conn.ExecContext(ctx, `
			WITH forgotten AS (
				DELETE FROM sign_in_failures WHERE id IN (
					SELECT id FROM sign_in_failures WHERE failed_at <= `+authClock+` - interval '24 hours'
					ORDER BY failed_at LIMIT 10 FOR UPDATE SKIP LOCKED))
			INSERT INTO sign_in_failures (email, client, failed_at) VALUES ($1, $2, `+authClock+`)`,
			email, client, s.now)
		return err
	})
	return wait, err
}

// SignedIn forgets client's failures for email, makes client familiar to the
// user (forgetting up to ten unseen for 30 days), and stores rehash, if set,
// unless the old hash changed meanwhile; updated_at stays.
func (s *store) SignedIn(ctx context.Context, email, client string, userID int64, old string, rehash passwordHash) error {
	return s.write(ctx, func(ctx context.Context, conn *sql.Conn) error {
		_, err := conn.ExecContext(ctx, `
			WITH reset AS (DELETE FROM sign_in_failures WHERE email = $1 AND client = $2),
			forgotten AS (
				DELETE FROM sign_in_clients WHERE (user_id, client) IN (
					SELECT user_id, client FROM sign_in_clients
					WHERE signed_in_at <= `+authClock+` - interval '30 days' AND (user_id, client) <> ($4::bigint, $2)
					ORDER BY signed_in_at LIMIT 10 FOR UPDATE SKIP LOCKED))
			INSERT INTO sign_in_clients (user_id, client, signed_in_at) VALUES ($4, $2, `+authClock+`)
			ON CONFLICT (user_id, client) DO UPDATE SET signed_in_at = excluded.signed_in_at`,
			email, client, s.now, userID)
		if err == nil && rehash.hash != "" {
			_, err = conn.ExecContext(ctx, `UPDATE users SET password = $3, salt = $4 WHERE id = $1 AND password = $2`, userID, old, rehash.hash, rehash.salt)
		}
		return err
	})
}

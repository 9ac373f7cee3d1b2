package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/lib/pq"
)

//go:embed schema.sql
var schemaSQL string

// schemaLockKey is the advisory lock that serializes schema.sql across
// replicas booting at the same time.
const schemaLockKey = 7_216_449_301

// The store turns driver errors into these, and handlers look only at them.
var (
	errNotFound    = errors.New("not found")
	errEmailTaken  = errors.New("email already registered")
	errUnavailable = errors.New("database unavailable")
)

// poolConfig sizes the connection pool.
type poolConfig struct {
	maxOpen     int           // connections open at once
	maxIdle     int           // connections kept open while idle
	maxIdleTime time.Duration // how long an idle connection is kept
	// transactionPooler says that a transaction-pooling proxy, such as
	// PgBouncer with pool_mode = transaction, stands between the service
	// and PostgreSQL (DB_POOLER=transaction).
	transactionPooler bool
}

// store is the service's data layer: every SQL statement lives here.
type store struct {
	db *sql.DB
	// timeout bounds the database time of each call, so that a database
	// that stops answering turns into errUnavailable instead of a hang.
	timeout time.Duration
	// The reads are prepared statements: a query with arguments costs lib/pq
	// two round trips (parse, then execute), a prepared one costs one.
	// database/sql prepares them on each connection the first time it
	// runs them there. Behind a transaction pooler they are nil: see
	// newConnector.
	userByID, userByEmail, usersAfter *sql.Stmt
	// now, if set, replaces the database's clock for the sign-in throttle:
	// tests set it to walk through the schedule. In production every
	// replica reads the one clock of the database.
	now func() time.Time
}

// openStore connects to the database at databaseURL, checks that it answers
// and applies the embedded schema. The caller must Close the store.
func openStore(ctx context.Context, databaseURL string, pool poolConfig, timeout time.Duration) (*store, error) {
	connector, err := newConnector(databaseURL, pool.transactionPooler)
	if err != nil {
		return nil, err
	}
	connector.Dialer(silenceDialer{timeout: timeout})
	db := sql.OpenDB(connector)
	db.SetMaxOpenConns(pool.maxOpen)
	db.SetMaxIdleConns(pool.maxIdle)
	db.SetConnMaxIdleTime(pool.maxIdleTime)
	s := &store{db: db, timeout: timeout}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	if pool.transactionPooler {
		return s, nil
	}
	for _, p := range []struct {
		stmt  **sql.Stmt
		query string
	}{
		{&s.userByID, userByIDQuery},
		{&s.userByEmail, userByEmailQuery},
		{&s.usersAfter, usersAfterQuery},
	} {
		if *p.stmt, err = db.PrepareContext(ctx, p.query); err != nil {
			db.Close()
			return nil, fmt.Errorf("prepare %q: %w", p.query, err)
		}
	}
	return s, nil
}

// newConnector returns the connector for databaseURL. Behind a transaction
// pooler the next transaction of a connection may run on another server
// connection, so nothing may outlive one: the store prepares no statement,
// and each query with arguments must go in one round trip. lib/pq otherwise
// sends it as Parse and Sync, then Bind and Execute, and the pooler may hand
// the server connection to another client in between. binary_parameters
// makes lib/pq send Parse, Bind, Execute and Sync together; it also sends
// []byte arguments in binary, and the store passes none.
func newConnector(databaseURL string, transactionPooler bool) (*pq.Connector, error) {
	cfg, err := pq.NewConfig(databaseURL)
	if err != nil {
		return nil, err
	}
	if transactionPooler {
		cfg.BinaryParameters = true
	}
	return pq.NewConnectorConfig(cfg)
}

// queryRow runs a read on its prepared statement, or, behind a transaction
// pooler where stmt is nil, as query in one round trip.
func (s *store) queryRow(ctx context.Context, stmt *sql.Stmt, query string, args ...any) *sql.Row {
	if stmt == nil {
		return s.db.QueryRowContext(ctx, query, args...)
	}
	return stmt.QueryRowContext(ctx, args...)
}

// query is queryRow for a read of many rows.
func (s *store) query(ctx context.Context, stmt *sql.Stmt, query string, args ...any) (*sql.Rows, error) {
	if stmt == nil {
		return s.db.QueryContext(ctx, query, args...)
	}
	return stmt.QueryContext(ctx, args...)
}

// migrate applies schema.sql in one transaction, holding an advisory lock so
// that replicas booting together apply it one after another.
func (s *store) migrate(ctx context.Context) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, schemaLockKey); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, schemaSQL); err != nil {
		return fmt.Errorf("apply schema.sql: %w", err)
	}
	return tx.Commit()
}

// Close closes the connection pool.
func (s *store) Close() error { return s.db.Close() }

// Ping reports whether the database answers.
func (s *store) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	return dbError(s.db.PingContext(ctx))
}

// user is a stored user as the API shows it: the password hash and salt are
// never read back, so they cannot leak into a response.
type user struct {
	ID        int64     `json:"id"`
	FirstName string    `json:"first_name"`
	LastName  string    `json:"last_name"`
	Email     string    `json:"email"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// userColumns are the columns scanUser reads, in its order.
const userColumns = `id, first_name, last_name, email, created_at, updated_at`

const (
	userByIDQuery = `SELECT ` + userColumns + ` FROM users WHERE id = $1`
	// userByEmailQuery finds a user by normalized email through the unique
	// index.
	userByEmailQuery = `SELECT ` + userColumns + ` FROM users WHERE email = $1`
	usersAfterQuery  = `SELECT ` + userColumns + ` FROM users WHERE id > $1 ORDER BY id LIMIT $2`
)

type scanner interface{ Scan(dest ...any) error }

func scanUser(row scanner) (user, error) {
	var u user
	err := u.scan(row)
	return u, err
}

// scan reads u from row, whose columns are userColumns and then extra.
func (u *user) scan(row scanner, extra ...any) error {
	err := row.Scan(append([]any{&u.ID, &u.FirstName, &u.LastName, &u.Email, &u.CreatedAt, &u.UpdatedAt}, extra...)...)
	u.CreatedAt = u.CreatedAt.UTC()
	u.UpdatedAt = u.UpdatedAt.UTC()
	return err
}

// newUser is a user to create. Email must already be normalized, and
// PasswordHash comes from the hasher; the salt is read from it.
type newUser struct {
	FirstName, LastName, Email, PasswordHash string
}

// userUpdate is a change to a user: a nil field is left as it is. Email must
// already be normalized, and PasswordHash comes from the hasher.
type userUpdate struct {
	FirstName, LastName, Email, PasswordHash *string
}

// CreateUser inserts a user. It returns errEmailTaken if another user has
// the same email.
func (s *store) CreateUser(ctx context.Context, c newUser) (user, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	row := s.db.QueryRowContext(ctx, `
		INSERT INTO users (first_name, last_name, email, password, salt)
		VALUES ($1, $2, $3, $4, $5)
		RETURNING `+userColumns,
		c.FirstName, c.LastName, c.Email, c.PasswordHash, bcryptSalt(c.PasswordHash))
	u, err := scanUser(row)
	return u, dbError(err)
}

// User returns the user with the given id, or errNotFound.
func (s *store) User(ctx context.Context, id int64) (user, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	u, err := scanUser(s.queryRow(ctx, s.userByID, userByIDQuery, id))
	return u, dbError(err)
}

// UserByEmail returns the user with the given normalized email, or
// errNotFound.
func (s *store) UserByEmail(ctx context.Context, email string) (user, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	u, err := scanUser(s.queryRow(ctx, s.userByEmail, userByEmailQuery, email))
	return u, dbError(err)
}

// Users returns up to limit users whose id is greater than afterID, ordered
// by id.
func (s *store) Users(ctx context.Context, afterID int64, limit int) ([]user, error) {
	users := make([]user, 0, min(limit, 1000))
	err := s.EachUser(ctx, afterID, limit, func(u *user) { users = append(users, *u) })
	return users, err
}

// EachUser calls fn for each of up to limit users whose id is greater than
// afterID, in id order. fn gets the same *user every time, filled anew: it
// must not keep it. The connection is held until the last call returns, so
// fn should be quick.
func (s *store) EachUser(ctx context.Context, afterID int64, limit int, fn func(*user)) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	rows, err := s.query(ctx, s.usersAfter, usersAfterQuery, afterID, limit)
	if err != nil {
		return dbError(err)
	}
	defer rows.Close()
	var u user
	for rows.Next() {
		if err := u.scan(rows); err != nil {
			return dbError(err)
		}
		fn(&u)
	}
	return dbError(rows.Err())
}

// UpdateUser applies c to the user with the given id in one statement, so
// concurrent changes to different fields cannot undo each other. updated_at
// moves forward only if a value actually changed. It returns errNotFound if
// no user has that id, and errEmailTaken if another user has c.Email.
func (s *store) UpdateUser(ctx context.Context, id int64, c userUpdate) (user, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var salt *string
	if c.PasswordHash != nil {
		s := bcryptSalt(*c.PasswordHash)
		salt = &s
	}
	// In SET, column names on the right refer to the row before the update.
	// GREATEST keeps updated_at strictly increasing even if the clock steps back.
	row := s.db.QueryRowContext(ctx, `
		UPDATE users SET
			first_name = COALESCE($2, first_name),
			last_name  = COALESCE($3, last_name),
			email      = COALESCE($4, email),
			password   = COALESCE($5, password),
			salt       = COALESCE($6, salt),
			updated_at = CASE
				WHEN (COALESCE($2, first_name), COALESCE($3, last_name), COALESCE($4, email), COALESCE($5, password))
					IS DISTINCT FROM (first_name, last_name, email, password)
				THEN GREATEST(now(), updated_at + interval '1 microsecond')
				ELSE updated_at
			END
		WHERE id = $1
		RETURNING `+userColumns,
		id, c.FirstName, c.LastName, c.Email, c.PasswordHash, salt)
	u, err := scanUser(row)
	return u, dbError(err)
}

// DeleteUser deletes the user with the given id, or returns errNotFound.
func (s *store) DeleteUser(ctx context.Context, id int64) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	res, err := s.db.ExecContext(ctx, `DELETE FROM users WHERE id = $1`, id)
	if err != nil {
		return dbError(err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return dbError(err)
	}
	if n == 0 {
		return errNotFound
	}
	return nil
}

// Credentials returns the user with the given normalized email and the
// password hash stored for it, or errNotFound.
func (s *store) Credentials(ctx context.Context, email string) (user, string, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var hash string
	row := s.db.QueryRowContext(ctx, `SELECT `+userColumns+`, password FROM users WHERE email = $1`, email)
	var u user
	err := u.scan(row, &hash)
	return u, hash, dbError(err)
}

// RehashPassword replaces the password hash (and so the salt) of the user
// with the given id, but only if the stored hash is still old: a password
// change that landed meanwhile wins. It reports whether the hash was
// replaced. The user's updated_at stays as it is, since nothing the API
// shows changed.
func (s *store) RehashPassword(ctx context.Context, id int64, old, hash string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	res, err := s.db.ExecContext(ctx, `UPDATE users SET password = $3, salt = $4 WHERE id = $1 AND password = $2`, id, old, hash, bcryptSalt(hash))
	if err != nil {
		return false, dbError(err)
	}
	n, err := res.RowsAffected()
	return n == 1, dbError(err)
}

// The sign-in throttle counts consecutive failed checks per normalized email
// address in the table auth_failures. The first five failures are free; from
// the fifth on, the next attempt must wait 1 second after the last failure,
// doubling with each further failure up to 15 minutes. A count is forgotten
// 24 hours after its last failure. Times are the database's (or store.now's),
// so that replicas whose clocks differ still agree.
const (
	// authClock is the throttle's "now".
	authClock = `COALESCE($2::timestamptz, now())`
	// authMemory is how long a count is kept after its last failure.
	authMemory = `interval '24 hours'`
	// authNextAttempt is when the next attempt is allowed, for a row of
	// auth_failures named f.
	authNextAttempt = `f.failed_at + CASE WHEN f.failures < 5 THEN interval '0'
		ELSE LEAST(interval '1 second' * power(2, LEAST(f.failures - 5, 10)), interval '15 minutes') END`
)

// authWaitQuery returns how long, in microseconds, an attempt for $1 must
// still wait, and no row if none.
const authWaitQuery = `
	SELECT (extract(epoch FROM (` + authNextAttempt + `) - ` + authClock + `) * 1000000)::bigint
	FROM auth_failures f
	WHERE f.email = $1 AND f.failed_at > ` + authClock + ` - ` + authMemory + `
		AND ` + authNextAttempt + ` > ` + authClock

// authFailQuery counts a failure for $1 unless the attempt is early, and
// returns no row if it is. It also deletes up to ten forgotten rows of other
// addresses, skipping any that another replica is deleting.
const authFailQuery = `
	WITH forgotten AS (
		DELETE FROM auth_failures WHERE email IN (
			SELECT email FROM auth_failures
			WHERE failed_at <= ` + authClock + ` - ` + authMemory + ` AND email <> $1
			ORDER BY failed_at LIMIT 10
			FOR UPDATE SKIP LOCKED))
	INSERT INTO auth_failures AS f (email, failures, failed_at)
	VALUES ($1, 1, ` + authClock + `)
	ON CONFLICT (email) DO UPDATE SET
		failures = CASE WHEN f.failed_at <= excluded.failed_at - ` + authMemory + ` THEN 1 ELSE f.failures + 1 END,
		failed_at = excluded.failed_at
	WHERE ` + authNextAttempt + ` <= excluded.failed_at
	RETURNING f.failures`

// clock is the time the throttle's queries take as $2: nil for the
// database's own.
func (s *store) clock() any {
	if s.now == nil {
		return nil
	}
	return s.now()
}

// AuthWait returns how long an attempt to sign in as the normalized email
// must still wait, or 0 if it may go ahead now.
func (s *store) AuthWait(ctx context.Context, email string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var micros int64
	err := s.db.QueryRowContext(ctx, authWaitQuery, email, s.clock()).Scan(&micros)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	return time.Duration(micros) * time.Microsecond, dbError(err)
}

// CountAuthFailure counts an attempt to sign in as the normalized email as a
// failure, before its password is checked, so that attempts made at once
// cannot all pass while the count is low; ResetAuthFailures undoes it on a
// success. If the attempt is early it counts nothing and returns how long
// it must still wait. Concurrent calls for one address are all counted.
func (s *store) CountAuthFailure(ctx context.Context, email string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	// An early attempt leaves the row alone, and so returns none; its wait
	// is read after. If the wait ended or the row went in between, the
	// attempt is tried again.
	for {
		var failures int
		err := s.db.QueryRowContext(ctx, authFailQuery, email, s.clock()).Scan(&failures)
		if !errors.Is(err, sql.ErrNoRows) {
			return 0, dbError(err)
		}
		var micros int64
		err = s.db.QueryRowContext(ctx, authWaitQuery, email, s.clock()).Scan(&micros)
		if !errors.Is(err, sql.ErrNoRows) {
			return time.Duration(micros) * time.Microsecond, dbError(err)
		}
	}
}

// ResetAuthFailures forgets the failures counted for the normalized email,
// after a success.
func (s *store) ResetAuthFailures(ctx context.Context, email string) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	_, err := s.db.ExecContext(ctx, `DELETE FROM auth_failures WHERE email = $1`, email)
	return dbError(err)
}

// dbError translates a driver error into the store's sentinels, keeping the
// original in the chain for the log.
func dbError(err error) error {
	var pqErr *pq.Error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, sql.ErrNoRows):
		return errNotFound
	case errors.As(err, &pqErr) && pqErr.Code == "23505" && pqErr.Constraint == "users_email_key": // unique_violation
		return errEmailTaken
	case isUnavailable(err):
		return fmt.Errorf("%w: %w", errUnavailable, err)
	}
	return err
}

// isUnavailable reports whether err means the database could not be reached
// or did not answer in time, as opposed to a fault in a query.
func isUnavailable(err error) bool {
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		switch pqErr.Code {
		case "57P01", "57P02", "57P03", // admin_shutdown, crash_shutdown, cannot_connect_now
			"53300", // too_many_connections
			"57014": // query_canceled: our deadline ran out
			return true
		}
		return pqErr.Code.Class() == "08" // connection_exception
	}
	var netErr net.Error
	return errors.As(err, &netErr) ||
		errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF)
}

// silenceDialer dials database connections on which every read gives up
// after timeout without data. lib/pq waits for the server's answer with no
// deadline of its own: when a context ends it asks the server, over the
// network, to cancel, and keeps waiting. If the network itself falls silent
// (a partition, a stuck proxy), that wait would hold the request, and its
// pooled connection, forever. lib/pq reads only while it expects an answer,
// so an idle connection is never cut by this.
type silenceDialer struct {
	net.Dialer
	timeout time.Duration
}

func (d silenceDialer) Dial(network, address string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, address)
}

func (d silenceDialer) DialTimeout(network, address string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return d.DialContext(ctx, network, address)
}

func (d silenceDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := d.Dialer.DialContext(ctx, network, address)
	if err != nil {
		return nil, err
	}
	return &silenceConn{Conn: c, timeout: d.timeout}, nil
}

type silenceConn struct {
	net.Conn
	timeout time.Duration
}

func (c *silenceConn) Read(b []byte) (int, error) {
	if err := c.Conn.SetReadDeadline(time.Now().Add(c.timeout)); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

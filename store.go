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
	"os"
	"sync"
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
	errStale       = errors.New("user has changed") // a version condition failed
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
	db        *sql.DB
	connector connector
	// timeout bounds the database time of each call, so that a database
	// that stops answering turns into errUnavailable instead of a hang.
	timeout time.Duration
	// setBounds begins a write's transaction with its server-side bounds
	// (see write).
	setBounds string
	// The user look-ups are prepared statements: a query with arguments costs lib/pq
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
	pqConnector, err := newConnector(databaseURL, pool.transactionPooler)
	if err != nil {
		return nil, err
	}
	b := newBounds(timeout)
	pqConnector.Dialer(silenceDialer{timeout: b.silence, silentSince: new(sync.Map)})
	c := connector{pqConnector}
	db := sql.OpenDB(c)
	db.SetMaxOpenConns(pool.maxOpen)
	db.SetMaxIdleConns(pool.maxIdle)
	db.SetConnMaxIdleTime(pool.maxIdleTime)
	s := &store{db: db, connector: c, timeout: timeout, setBounds: fmt.Sprintf(
		`BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL statement_timeout = %d; SET LOCAL lock_timeout = %d`, b.statement.Milliseconds(), b.lock.Milliseconds())}
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

// defaultConnectTimeout is each host's bound to connect, if DATABASE_URL
// gives no connect_timeout.
const defaultConnectTimeout = 2 * time.Second

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
	// Each host gets its own bound to connect, so that one which takes
	// connections and never answers leaves time for the next.
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = defaultConnectTimeout
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
	err := s.db.PingContext(ctx)
	if !errors.Is(err, driver.ErrBadConn) {
		return dbError(err)
	}
	// database/sql pings the pooled connection it takes and does not try
	// another: after a database restart, or pg_terminate_backend, that one
	// is dead while the database may be fine. A new connection tells.
	cn, err := s.connector.Connect(ctx)
	if err != nil {
		return dbError(err)
	}
	defer cn.Close()
	return dbError(cn.(driver.Pinger).Ping(ctx))
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
	Version   int64     `json:"-"` // goes up with every change: the ETag
}

// userColumns are the columns scanUser reads, in its order.
const userColumns = `id, first_name, last_name, email, created_at, updated_at, version`

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
	err := u.scan(row, nil)
	return u, err
}

// scan reads u from row, whose columns are userColumns and then, if
// password is not nil, the password hash.
func (u *user) scan(row scanner, password *string) error {
	var err error
	if password == nil {
		err = row.Scan(&u.ID, &u.FirstName, &u.LastName, &u.Email, &u.CreatedAt, &u.UpdatedAt, &u.Version)
	} else {
		err = row.Scan(&u.ID, &u.FirstName, &u.LastName, &u.Email, &u.CreatedAt, &u.UpdatedAt, &u.Version, password)
	}
	u.CreatedAt = u.CreatedAt.UTC()
	u.UpdatedAt = u.UpdatedAt.UTC()
	return err
}

// write runs f in a transaction whose statements PostgreSQL itself aborts,
// and rolls back, once they wait for a lock longer than lock_timeout or run
// longer than statement_timeout. Both are shorter than the call's bound, so
// the server gives up before the service does, and the silence bound on
// the connection is longer still (see bounds). So a write the service
// reports as failed has been rolled back, and even a statement still queued
// on a connection the service closed cannot commit: only COMMIT would. What
// no one can settle is a COMMIT whose answer is lost: it may have committed.
// And statement_timeout does not cover a COMMIT's wait for a synchronous
// standby: the call's bound ends it, with a cancel request, and PostgreSQL
// then keeps the commit locally and reports success.
//
// The transaction begins with one simple query, BEGIN and the bounds as SET
// LOCAL. It is READ COMMITTED whatever the database's default: the
// statements are written for it, and a stricter level would fail some of
// them under concurrency (40001), for no gain. Not per connection: a
// transaction-pooling proxy such as PgBouncer refuses them as startup
// parameters and may hand a session's SET to another client. And not database/sql's BeginTx: lib/pq sends BEGIN READ
// WRITE, which would override a database's default_transaction_read_only.
func (s *store) write(ctx context.Context, f func(ctx context.Context, conn *sql.Conn) error) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	conn, err := s.begin(ctx)
	if err != nil {
		return dbError(err)
	}
	defer conn.Close()
	committed := false
	defer func() {
		if !committed {
			rollback(ctx, conn)
		}
	}()
	if err := f(ctx, conn); err != nil {
		return dbError(err)
	}
	_, err = conn.ExecContext(ctx, `COMMIT`)
	committed = err == nil
	return dbError(err)
}

// begin takes a pooled connection and begins a write's transaction on it.
// Pooled connections may be dead (after a database restart, say), and
// database/sql retries only its own calls, and only on some errors, so
// begin tries another connection, up to a pool's worth: nothing was done on
// a connection that failed at BEGIN.
func (s *store) begin(ctx context.Context) (*sql.Conn, error) {
	for attempt := 1; ; attempt++ {
		conn, err := s.db.Conn(ctx)
		if err != nil {
			return nil, err
		}
		_, err = conn.ExecContext(ctx, s.setBounds)
		if err == nil {
			return conn, nil
		}
		rollback(ctx, conn) // it may have begun
		conn.Close()
		if !deadConn(err) || attempt > max(s.db.Stats().MaxOpenConnections, 2) {
			return nil, err
		}
	}
}

// deadConn reports whether err is the failure of a connection that the
// server has closed, rather than an answer or a timeout.
func deadConn(err error) bool {
	var netErr net.Error
	return errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.As(err, &netErr) && !netErr.Timeout()
}

// rollback ends the transaction on conn, if there is one, before conn goes
// back to the pool: with ROLLBACK, or if that cannot be done, by having the
// pool discard conn, and the server rolls back when it reads the end of it.
func rollback(ctx context.Context, conn *sql.Conn) {
	if ctx.Err() == nil {
		if _, err := conn.ExecContext(ctx, `ROLLBACK`); err == nil {
			return
		}
	}
	conn.Raw(func(any) error { return driver.ErrBadConn })
}

// newUser is a user to create. Email must already be normalized.
type newUser struct {
	FirstName, LastName, Email string
	Password                   passwordHash
}

// userUpdate is a change to a user: a nil field is left as it is. Email must
// already be normalized.
type userUpdate struct {
	FirstName, LastName, Email *string
	Password                   *passwordHash
	// Versions, if not nil, are the versions the user may have (If-Match).
	Versions []int64
	// Check, if not nil, vets the user as changed; its error undoes the change.
	Check func(user) error
}

// CreateUser inserts a user. It returns errEmailTaken if another user has
// the same email.
func (s *store) CreateUser(ctx context.Context, c newUser) (user, error) {
	var u user
	err := s.write(ctx, func(ctx context.Context, conn *sql.Conn) error {
		var err error
		u, err = scanUser(conn.QueryRowContext(ctx, `
			INSERT INTO users (first_name, last_name, email, password, salt)
			VALUES ($1, $2, $3, $4, $5)
			RETURNING `+userColumns,
			c.FirstName, c.LastName, c.Email, c.Password.hash, c.Password.salt))
		return err
	})
	return u, err
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

// NFC returns text in Unicode Normalization Form C.
func (s *store) NFC(ctx context.Context, text string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var nfc string
	err := s.db.QueryRowContext(ctx, `SELECT normalize($1, NFC)`, text).Scan(&nfc)
	return nfc, dbError(err)
}

// Users returns up to limit users whose id is greater than afterID, ordered
// by id.
func (s *store) Users(ctx context.Context, afterID int64, limit int) ([]user, error) {
	users := make([]user, 0, limit)
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
		// Scanning *sql.Rows, not a scanner, keeps the arguments off the heap.
		if err := rows.Scan(&u.ID, &u.FirstName, &u.LastName, &u.Email, &u.CreatedAt, &u.UpdatedAt, &u.Version); err != nil {
			return dbError(err)
		}
		u.CreatedAt, u.UpdatedAt = u.CreatedAt.UTC(), u.UpdatedAt.UTC()
		fn(&u)
	}
	return dbError(rows.Err())
}

// UpdateUser applies c to the user with the given id in one statement, so
// concurrent changes to different fields cannot undo each other, and two
// writers with the same c.Versions cannot both pass. updated_at and version
// move forward only if a value actually changed. A new password forgets the
// failed sign-ins of the user's address. It returns errNotFound if no user
// has that id, errStale if its version is not among c.Versions,
// errEmailTaken if another user has c.Email, and c.Check's error.
func (s *store) UpdateUser(ctx context.Context, id int64, c userUpdate) (user, error) {
	var hash, salt *string
	if c.Password != nil {
		hash, salt = &c.Password.hash, &c.Password.salt
	}
	var u user
	err := s.write(ctx, func(ctx context.Context, conn *sql.Conn) error {
		// In SET, column names on the right refer to the row before the
		// update. GREATEST keeps updated_at strictly increasing even if the
		// clock steps back.
		const changed = `(COALESCE($2, first_name), COALESCE($3, last_name), COALESCE($4, email), COALESCE($5, password))
			IS DISTINCT FROM (first_name, last_name, email, password)`
		var err error
		u, err = scanUser(conn.QueryRowContext(ctx, `
			UPDATE users SET
				first_name = COALESCE($2, first_name),
				last_name  = COALESCE($3, last_name),
				email      = COALESCE($4, email),
				password   = COALESCE($5, password),
				salt       = COALESCE($6, salt),
				updated_at = CASE WHEN `+changed+` THEN GREATEST(now(), updated_at + interval '1 microsecond') ELSE updated_at END,
				version    = CASE WHEN `+changed+` THEN version + 1 ELSE version END
			WHERE id = $1 AND ($7::bigint[] IS NULL OR version = ANY ($7))
			RETURNING `+userColumns,
			id, c.FirstName, c.LastName, c.Email, hash, salt, pq.Array(c.Versions)))
		if errors.Is(err, sql.ErrNoRows) {
			return missingOrStale(ctx, conn, id)
		}
		if err == nil && c.Check != nil {
			err = c.Check(u)
		}
		if err == nil && c.Password != nil {
			_, err = conn.ExecContext(ctx, `DELETE FROM sign_in_failures WHERE email = $1`, u.Email)
		}
		return err
	})
	return u, err
}

// missingOrStale tells why a conditional write of the user with the given id
// found no row: errStale if the user exists, errNotFound if not.
func missingOrStale(ctx context.Context, conn *sql.Conn, id int64) error {
	var exists bool
	if err := conn.QueryRowContext(ctx, `SELECT EXISTS (SELECT FROM users WHERE id = $1)`, id).Scan(&exists); err != nil {
		return err
	}
	if exists {
		return errStale
	}
	return errNotFound
}

// DeleteUser deletes the user with the given id, with the failed sign-ins
// of its address and its familiar clients, if its version is among versions
// (any version if versions is nil). It returns errNotFound if no user has
// that id, and errStale if its version is not among versions.
func (s *store) DeleteUser(ctx context.Context, id int64, versions []int64) error {
	return s.write(ctx, func(ctx context.Context, conn *sql.Conn) error {
		// A stale version rolls back the failures' delete too.
		res, err := conn.ExecContext(ctx, `
			WITH failures AS (DELETE FROM sign_in_failures WHERE email = (SELECT email FROM users WHERE id = $1))
			DELETE FROM users WHERE id = $1 AND ($2::bigint[] IS NULL OR version = ANY ($2))`, id, pq.Array(versions))
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		if err != nil {
			return err
		}
		if n == 0 {
			return missingOrStale(ctx, conn, id)
		}
		return nil
	})
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
func (s *store) RehashPassword(ctx context.Context, id int64, old string, hash passwordHash) (bool, error) {
	var n int64
	err := s.write(ctx, func(ctx context.Context, conn *sql.Conn) error {
		res, err := conn.ExecContext(ctx, `UPDATE users SET password = $3, salt = $4 WHERE id = $1 AND password = $2`, id, old, hash.hash, hash.salt)
		if err != nil {
			return err
		}
		n, err = res.RowsAffected()
		return err
	})
	return n == 1, err
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

// isUnavailable reports whether err means the database could not be reached,
// did not answer in time or cannot take the work now, as opposed to a fault
// in a query.
func isUnavailable(err error) bool {
	var connErr *connectError
	if errors.As(err, &connErr) {
		return true // whatever stops a connection, a wrong password included
	}
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		switch pqErr.Code {
		case "57P01", "57P02", "57P03", // admin_shutdown, crash_shutdown, cannot_connect_now
			"53300", // too_many_connections
			"57014", // query_canceled: a bound ran out
			"55P03", // lock_not_available: lock_timeout ran out
			"40001", // serialization_failure: try again
			"40P01", // deadlock_detected: try again
			"55000", // object_not_in_prerequisite_state: the database takes no connections
			"25006": // read_only_sql_transaction: a standby, or a demoted primary
			return true
		}
		return pqErr.Code.Class() == "08" // connection_exception
	}
	var netErr net.Error
	return deadConn(err) || errors.As(err, &netErr) || errors.Is(err, context.DeadlineExceeded)
}

// bounds are the limits on a store call, from the shortest to the longest.
type bounds struct {
	// lock and statement are the server's: PostgreSQL aborts a write that
	// waits for a lock, or runs, longer.
	lock, statement time.Duration
	// call is the service's own: a call's context ends then, and lib/pq
	// asks the server to cancel what runs.
	call time.Duration
	// silence is the network's: a connection that stays silent that long
	// while an answer is awaited is closed, without asking the server
	// anything. It comes last, so the server has given up first and said so.
	silence time.Duration
}

func newBounds(call time.Duration) bounds {
	return bounds{
		lock:      max(call*3/5, time.Millisecond),
		statement: max(call*4/5, time.Millisecond),
		call:      call,
		silence:   call + time.Second,
	}
}

// connector opens the pool's connections with lib/pq, and marks every error
// met while connecting as a connectError.
type connector struct{ *pq.Connector }

func (c connector) Connect(ctx context.Context) (driver.Conn, error) {
	cn, err := c.Connector.Connect(ctx)
	if err != nil {
		return nil, &connectError{err}
	}
	return cn, nil
}

// connectError is an error met while opening a database connection. While
// the service runs, any such error means the database cannot be used now:
// unreachable, starting up, full, renamed, or refusing the credentials.
type connectError struct{ err error }

func (e *connectError) Error() string { return e.err.Error() }
func (e *connectError) Unwrap() error { return e.err }

// silenceDialer dials database connections on which every read gives up
// after timeout without data: lib/pq has no read deadline of its own, and
// a silent network (a partition, a stuck proxy) would hold a request and
// its connection forever. lib/pq reads only while it expects an answer, so
// an idle connection is never cut. Until connected, lib/pq's connect
// deadline holds instead, cut to the dial's context (the call's bound) and
// to timeout.
type silenceDialer struct {
	net.Dialer
	timeout time.Duration
	// silentSince holds, by address, when a connection there last fell
	// silent: older ones fail at their next write, which lib/pq and
	// database/sql retry on another, rather than each wait in turn.
	silentSince *sync.Map
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
	connectBy := time.Now().Add(d.timeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(connectBy) {
		connectBy = dl
	}
	return &silenceConn{Conn: c, silenceDialer: d, address: address, opened: time.Now(), connectBy: connectBy}, nil
}

type silenceConn struct {
	net.Conn
	silenceDialer
	address   string
	opened    time.Time
	deadline  time.Time // the read deadline set last
	connectBy time.Time // the deadline while connecting; zero once connected
}

// silenceSlack is how much of the silence bound a read may find used up:
// moving a deadline costs a timer update, and a busy connection reads
// thousands of times a second, so the deadline moves only once it is this
// much nearer than the whole bound.
const silenceSlack = 50 * time.Millisecond

func (c *silenceConn) Read(b []byte) (int, error) {
	if now := time.Now(); c.connectBy.IsZero() && c.deadline.Sub(now) < c.timeout-silenceSlack {
		c.deadline = now.Add(c.timeout)
		if err := c.Conn.SetReadDeadline(c.deadline); err != nil {
			return 0, err
		}
	}
	n, err := c.Conn.Read(b)
	if c.connectBy.IsZero() && errors.Is(err, os.ErrDeadlineExceeded) {
		c.silentSince.Store(c.address, time.Now())
	}
	return n, err
}

func (c *silenceConn) Write(b []byte) (int, error) {
	if t, ok := c.silentSince.Load(c.address); ok && c.opened.Before(t.(time.Time)) {
		return 0, errors.New("a connection to this host fell silent")
	}
	return c.Conn.Write(b)
}

// SetDeadline is how lib/pq bounds connecting (connect_timeout), and lifts
// that bound once connected.
func (c *silenceConn) SetDeadline(t time.Time) error {
	if !t.IsZero() && !c.connectBy.IsZero() && c.connectBy.Before(t) {
		t = c.connectBy
	}
	c.connectBy = t
	return c.Conn.SetDeadline(t)
}

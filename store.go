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
	"slices"
	"sync"
	"time"

	"github.com/lib/pq"
)

//go:embed schema.sql
var schemaSQL string

// The store turns driver errors into these, and handlers look only at them.
var (
	errNotFound    = errors.New("not found")
	errEmailTaken  = errors.New("email already registered")
	errStale       = errors.New("user has changed") // a version condition failed
	errUnavailable = errors.New("database unavailable")
)

// poolConfig sizes the connection pool.
type poolConfig struct {
	maxOpen           int           // connections open at once
	maxIdle           int           // connections kept open while idle
	maxIdleTime       time.Duration // how long an idle connection is kept
	transactionPooler bool          // PgBouncer or the like, pool_mode = transaction
}

// store is the service's data layer: every SQL statement lives here.
type store struct {
	db        *sql.DB
	connector connector
	timeout   time.Duration // each call's bound: then errUnavailable, not a hang
	setBounds string        // begins a write's transaction (see write)
	// The user reads, prepared (one round trip, not two), or nil.
	userByID, userByEmail, usersAfter *sql.Stmt
	now                               driver.Valuer // if set, the sign-in throttle's clock (tests)
}

// openStore connects to the database at databaseURL, checks that it answers
// and applies the embedded schema. The caller must Close the store.
func openStore(ctx context.Context, databaseURL string, pool poolConfig, timeout time.Duration) (*store, error) {
	cfg, err := pq.NewConfig(databaseURL)
	if err != nil {
		return nil, err
	}
	// Behind a transaction pooler each query goes in one round trip (the
	// store passes no []byte). Each host gets its own bound to connect.
	cfg.BinaryParameters = cfg.BinaryParameters || pool.transactionPooler
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 2 * time.Second
	}
	pqConnector, err := pq.NewConnectorConfig(cfg)
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
	if err := s.prepare(ctx, pool.transactionPooler); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// prepare applies schema.sql, one simple query and so one transaction, then
// prepares the user reads, unless behind a transaction pooler.
func (s *store) prepare(ctx context.Context, transactionPooler bool) error {
	if _, err := s.db.ExecContext(ctx, schemaSQL); err != nil {
		return fmt.Errorf("apply schema.sql: %w", err)
	}
	if transactionPooler {
		return nil
	}
	var err error
	for stmt, query := range map[**sql.Stmt]string{&s.userByID: userByIDQuery, &s.userByEmail: userByEmailQuery, &s.usersAfter: usersAfterQuery} {
		if *stmt, err = s.db.PrepareContext(ctx, query); err != nil {
			break
		}
	}
	return err
}

// readUser reads one user with stmt, or, where stmt is nil, with query.
func (s *store) readUser(ctx context.Context, stmt *sql.Stmt, query string, arg any) (user, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var row *sql.Row
	if stmt != nil {
		row = stmt.QueryRowContext(ctx, arg)
	} else {
		row = s.db.QueryRowContext(ctx, query, arg)
	}
	u, err := scanUser(row)
	return u, dbError(err)
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
	// database/sql pings one pooled connection, which may be dead after a
	// restart while the database is fine: a new connection tells.
	cn, err := s.connector.Connect(ctx)
	if err != nil {
		return dbError(err)
	}
	defer cn.Close()
	return dbError(cn.(driver.Pinger).Ping(ctx))
}

// user is a stored user as the API shows it: hash and salt are never read.
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
	userByIDQuery    = `SELECT ` + userColumns + ` FROM users WHERE id = $1`
	userByEmailQuery = `SELECT ` + userColumns + ` FROM users WHERE email = $1`
	usersAfterQuery  = `SELECT ` + userColumns + ` FROM users WHERE id > $1 ORDER BY id LIMIT $2`
)

// scanUser reads a user from row's userColumns, and the rest into more.
func scanUser(row *sql.Row, more ...any) (user, error) {
	var u user
	err := row.Scan(append([]any{&u.ID, &u.FirstName, &u.LastName, &u.Email, &u.CreatedAt, &u.UpdatedAt, &u.Version}, more...)...)
	u.CreatedAt, u.UpdatedAt = u.CreatedAt.UTC(), u.UpdatedAt.UTC()
	return u, err
}

// newUser is a user to create. Email must already be normalized.
type newUser struct {
	FirstName, LastName, Email string
	Password                   passwordHash
}

// userUpdate is a change to a user: a nil field is left as it is. Email must already be normalized.
type userUpdate struct {
	FirstName, LastName, Email *string
	Password                   *passwordHash
	Versions                   []int64          // if not nil, the versions it may have (If-Match)
	Check                      func(user) error // if not nil, vets the changed user; an error undoes it
}

// CreateUser inserts a user. It returns errEmailTaken if another user has the same email.
func (s *store) CreateUser(ctx context.Context, c newUser) (user, error) {
	var u user
	err := s.write(ctx, func(ctx context.Context, conn *sql.Conn) (err error) {
		// Failures counted before the address had this user are not its.
		u, err = scanUser(conn.QueryRowContext(ctx, `
			WITH forgotten AS (DELETE FROM sign_in_failures WHERE email = $3)
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
	return s.readUser(ctx, s.userByID, userByIDQuery, id)
}

// UserByEmail returns the user with the given normalized email, or errNotFound.
func (s *store) UserByEmail(ctx context.Context, email string) (user, error) {
	return s.readUser(ctx, s.userByEmail, userByEmailQuery, email)
}

// NFC returns text in Unicode Normalization Form C.
func (s *store) NFC(ctx context.Context, text string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var nfc string
	err := s.db.QueryRowContext(ctx, `SELECT normalize($1, NFC)`, text).Scan(&nfc)
	return nfc, dbError(err)
}

// Users returns up to limit users whose id is greater than afterID, by id.
func (s *store) Users(ctx context.Context, afterID int64, limit int) ([]user, error) {
	users := make([]user, 0, limit)
	err := s.EachUser(ctx, afterID, limit, func(u *user) { users = append(users, *u) })
	return users, err
}

// EachUser calls fn for up to limit users after afterID, in id order, with
// one *user filled anew each time: fn must not keep it, and should be quick.
func (s *store) EachUser(ctx context.Context, afterID int64, limit int, fn func(*user)) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var rows *sql.Rows
	var err error
	if s.usersAfter == nil {
		rows, err = s.db.QueryContext(ctx, usersAfterQuery, afterID, limit)
	} else {
		rows, err = s.usersAfter.QueryContext(ctx, afterID, limit)
	}
	if err != nil {
		return dbError(err)
	}
	defer rows.Close()
	var u user
	for rows.Next() {
		// Scanning *sql.Rows, not an interface, keeps the arguments off the heap.
		if err := rows.Scan(&u.ID, &u.FirstName, &u.LastName, &u.Email, &u.CreatedAt, &u.UpdatedAt, &u.Version); err != nil {
			return dbError(err)
		}
		u.CreatedAt, u.UpdatedAt = u.CreatedAt.UTC(), u.UpdatedAt.UTC()
		fn(&u)
	}
	return dbError(rows.Err())
}

// UpdateUser applies c to the user with the given id in one statement, so
// concurrent changes cannot undo each other. updated_at and version move
// only if a value changed. A new password forgets the address's failed
// sign-ins. It returns errNotFound, errStale if the version is not among
// c.Versions, errEmailTaken, or c.Check's error.
func (s *store) UpdateUser(ctx context.Context, id int64, c userUpdate) (user, error) {
	var hash, salt *string
	if c.Password != nil {
		hash, salt = &c.Password.hash, &c.Password.salt
	}
	var u user
	err := s.write(ctx, func(ctx context.Context, conn *sql.Conn) (err error) {
		// In SET, columns on the right are the row before the update.
		// GREATEST keeps updated_at increasing if the clock steps back.
		const changed = `(COALESCE($2, first_name), COALESCE($3, last_name), COALESCE($4, email), COALESCE($5, password))
			IS DISTINCT FROM (first_name, last_name, email, password)`
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
		if err == nil && (c.Password != nil || c.Email != nil) { // as on create
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

// DeleteUser deletes the user with the given id, with its address's failed
// sign-ins and its familiar clients, if its version is among versions (nil:
// any). It returns errNotFound, or errStale if the version is not among them.
func (s *store) DeleteUser(ctx context.Context, id int64, versions []int64) error {
	return s.write(ctx, func(ctx context.Context, conn *sql.Conn) error {
		// A stale version rolls back the failures' delete too.
		res, err := conn.ExecContext(ctx, `
			WITH failures AS (DELETE FROM sign_in_failures WHERE email = (SELECT email FROM users WHERE id = $1))
			DELETE FROM users WHERE id = $1 AND ($2::bigint[] IS NULL OR version = ANY ($2))`, id, pq.Array(versions))
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil || n > 0 {
			return err
		}
		return missingOrStale(ctx, conn, id)
	})
}

// Credentials returns the user with the given normalized email and the
// password hash stored for it, or errNotFound.
func (s *store) Credentials(ctx context.Context, email string) (user, string, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var hash string
	u, err := scanUser(s.db.QueryRowContext(ctx, `SELECT `+userColumns+`, password FROM users WHERE email = $1`, email), &hash)
	return u, hash, dbError(err)
}

// write runs f in a READ COMMITTED transaction that PostgreSQL itself rolls
// back once a statement outlasts lock_timeout or statement_timeout, both
// within the call's bound: a write reported failed is rolled back, bar a
// COMMIT whose answer is lost. It begins with one simple query (a pooler
// passes it; lib/pq's BeginTx would override default_transaction_read_only).
func (s *store) write(ctx context.Context, f func(ctx context.Context, conn *sql.Conn) error) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	conn, err := s.begin(ctx)
	if err != nil {
		return dbError(err)
	}
	defer conn.Close()
	if err = f(ctx, conn); err == nil {
		_, err = conn.ExecContext(ctx, `COMMIT`)
	}
	if err != nil {
		rollback(ctx, conn)
	}
	return dbError(err)
}

// begin begins a write's transaction on a pooled connection. One may be
// dead (after a restart, say), so it tries up to a pool's worth.
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

// deadConn reports whether err is a connection the server closed.
func deadConn(err error) bool {
	var netErr net.Error
	return errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.As(err, &netErr) && !netErr.Timeout()
}

// rollback ends conn's transaction, if any, before conn goes back to the
// pool: with ROLLBACK, or else by having the pool discard conn.
func rollback(ctx context.Context, conn *sql.Conn) {
	if ctx.Err() == nil {
		if _, err := conn.ExecContext(ctx, `ROLLBACK`); err == nil {
			return
		}
	}
	conn.Raw(func(any) error { return driver.ErrBadConn })
}

// unavailableCodes mean "not now", beside class 08: shutdown or startup, too many
// connections, a bound ran out, try again, no connections taken, read-only.
var unavailableCodes = []string{"57P01", "57P02", "57P03", "53300", "57014", "55P03", "40001", "40P01", "55000", "25006"}

// dbError translates a driver error into the store's sentinels, keeping the
// original in the chain. Any error met while connecting means unavailable.
func dbError(err error) error {
	var pqErr *pq.Error
	isPQ := errors.As(err, &pqErr)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, sql.ErrNoRows):
		return errNotFound
	case isPQ && pqErr.Code == "23505" && pqErr.Constraint == "users_email_key": // unique_violation
		return errEmailTaken
	case errors.As(err, new(connectError)),
		isPQ && (pqErr.Code.Class() == "08" || slices.Contains(unavailableCodes, string(pqErr.Code))),
		!isPQ && (deadConn(err) || errors.As(err, new(net.Error)) || errors.Is(err, context.DeadlineExceeded)):
		return fmt.Errorf("%w: %w", errUnavailable, err)
	}
	return err
}

// bounds are a store call's limits, shortest first: the server's lock and
// statement timeouts; call, when lib/pq asks the server to cancel; and
// silence, after which a connection awaiting an answer is closed.
type bounds struct{ lock, statement, call, silence time.Duration }

func newBounds(call time.Duration) bounds {
	return bounds{
		lock:      max(call*3/5, time.Millisecond),
		statement: max(call*4/5, time.Millisecond),
		call:      call,
		silence:   call + time.Second,
	}
}

// connector marks every error met while connecting as a connectError.
type connector struct{ *pq.Connector }

func (c connector) Connect(ctx context.Context) (driver.Conn, error) {
	cn, err := c.Connector.Connect(ctx)
	if err != nil {
		return nil, connectError{err}
	}
	return cn, nil
}

// connectError is an error met while opening a database connection.
type connectError struct{ error }

func (e connectError) Unwrap() error { return e.error }

// silenceDialer dials connections whose reads, which lib/pq makes only
// while it awaits an answer, give up after timeout without data. While
// connecting, lib/pq's deadline holds instead, cut to ctx's and timeout.
type silenceDialer struct {
	net.Dialer
	timeout time.Duration
	// silentSince holds when a connection to each address fell silent: older
	// ones fail at their next write, and are retried on another.
	silentSince *sync.Map
}

// lib/pq dials with DialContext; Dial and DialTimeout complete its Dialer.
func (d silenceDialer) Dial(network, address string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, address)
}

func (d silenceDialer) DialTimeout(network, address string, timeout time.Duration) (net.Conn, error) {
	d.Dialer.Timeout = timeout
	return d.Dial(network, address)
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

func (c *silenceConn) Read(b []byte) (int, error) {
	// The deadline moves once 50 ms of it are used, not on each of
	// thousands of reads a second.
	if now := time.Now(); c.connectBy.IsZero() && c.deadline.Sub(now) < c.timeout-50*time.Millisecond {
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

// SetDeadline is how lib/pq bounds connecting (connect_timeout), and lifts that bound once connected.
func (c *silenceConn) SetDeadline(t time.Time) error {
	if !t.IsZero() && !c.connectBy.IsZero() && c.connectBy.Before(t) {
		t = c.connectBy
	}
	c.connectBy = t
	return c.Conn.SetDeadline(t)
}

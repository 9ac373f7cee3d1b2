// Command users serves a user-management REST API backed by PostgreSQL.
//
// It reads its configuration from the environment and flags (see README.md),
// applies the embedded schema.sql on boot, and stops gracefully on SIGINT or
// SIGTERM.
package main

import (
	"cmp"
	"container/list"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"

	"github.com/lib/pq"
)

const (
	defaultAddr        = "127.0.0.1:8000"
	defaultDatabaseURL = "postgres://localhost:5432/postgres?sslmode=disable"
	defaultBcryptCost  = 12

	// connectTimeout bounds connecting to the database and applying the
	// schema at start.
	connectTimeout = 5 * time.Second
	// queryTimeout bounds the database time of each store call.
	queryTimeout = 5 * time.Second
	// hashWait is how long a request waits for a free hashing slot before
	// it is answered 503.
	hashWait = 10 * time.Second
	// shutdownTimeout bounds how long in-flight requests may take to finish
	// after a shutdown signal.
	shutdownTimeout = 20 * time.Second

	// HTTP server timeouts. ReadHeaderTimeout cuts clients that trickle
	// headers; ReadTimeout bounds reading a whole request body (1 MiB at
	// 64 KiB/s); WriteTimeout bounds the response and so must cover the
	// hash wait, a hash and a query (a list stream moves it on as it
	// sends); IdleTimeout frees idle keep-alive connections.
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 16 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 60 * time.Second
	maxHeaderBytes    = 64 << 10
	// streamStall: a whole-table list whose client takes nothing for this
	// long is cut, and its stream slot freed.
	streamStall = 10 * time.Second

	// defaultMaxStreams is how many whole-table list streams are served at
	// once, unless MAX_STREAMS says otherwise.
	defaultMaxStreams = 32
	// maxDefaultClients caps the default MAX_CLIENTS whatever the file
	// limit: each connection held costs some 20 KiB of memory.
	maxDefaultClients = 4096
	// fileReserve is how many file descriptors the default MAX_CLIENTS
	// leaves for everything but clients and the database pool: standard
	// streams, the listener, the runtime's poller, connections being
	// refused.
	fileReserve = 64
)

func main() {
	// One P more than the runtime takes (the CPUs, or a container's CPU
	// limit): run lets bcrypt use every P but one, so every CPU can hash
	// and a flood of creates still leaves a P to serve reads. Measured on
	// 2 CPUs at cost 10, 32 clients creating while 4 read: 31 hashes a
	// second and reads at p99 21 ms with it; 18 hashes a second and p99
	// 7 ms without it (one hashing P); with every P hashing, reads waited
	// for the scheduler's 10 ms preemption at each step, p99 42 ms. Setting
	// GOMAXPROCS stops the runtime from following a changed CPU limit.
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 1)
	}
	if err := run(context.Background(), os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "users:", err)
		os.Exit(1)
	}
}

// config is everything the service reads from its environment and flags.
type config struct {
	addr        string
	databaseURL string
	bcryptCost  int
	apiToken    string
	pool        poolConfig
	maxClients  int
	maxStreams  int

	// maxClientsSet is MAX_CLIENTS as given, and maxClientsFrom the setting
	// that gave it: its default and its bound depend on the file limit and
	// the pool, known only once every setting is read.
	maxClientsSet, maxClientsFrom string

	// Which setting, as errors name it, gave addr and databaseURL, whose
	// problems show only once run uses them.
	addrFrom, databaseURLFrom string
}

// setting is one value the service reads at start: an environment variable
// and, if flag is not empty, a command-line flag that wins over it. The
// table in settings drives both loadConfig and -h.
type setting struct {
	env   string // the environment variable
	flag  string // the flag, without its dash; "" for none
	def   string // the default, applied by set and shown by -h; "" for none
	usage string // what it is, for -h
	// set applies value; from is where it came from, the variable or the
	// flag, as errors name it. It is nil for a setting that the Go runtime
	// reads, not run.
	set func(cfg *config, from, value string) error
}

// settings lists every setting, in the order loadConfig applies them: the
// defaults, then the environment, then the flags, each in this order (so
// ADDR, after PORT, wins over it).
func settings() []setting {
	return []setting{
		{"DATABASE_URL", "database-url", defaultDatabaseURL, "PostgreSQL connection URL (postgres://...; several hosts as h1:p1,h2:p2) or key=value settings",
			func(cfg *config, from, v string) error {
				cfg.databaseURL, cfg.databaseURLFrom = v, from
				return nil
			}},
		{"PORT", "", "", "if ADDR is not set, listen on :PORT (as hosting platforms expect)",
			func(cfg *config, from, v string) error {
				if n, err := strconv.Atoi(v); err != nil || n < 1 || n > 65535 {
					return fmt.Errorf("must be a port number from 1 to 65535, got %q", v)
				}
				cfg.addr, cfg.addrFrom = ":"+v, from
				return nil
			}},
		{"ADDR", "addr", defaultAddr, "address to listen on",
			func(cfg *config, from, v string) error {
				cfg.addr, cfg.addrFrom = v, from
				return nil
			}},
		{"BCRYPT_COST", "bcrypt-cost", strconv.Itoa(defaultBcryptCost), "bcrypt cost, 10 to 15; each step doubles the time a hash takes",
			func(cfg *config, _, v string) (err error) {
				cfg.bcryptCost, err = parseBcryptCost(v)
				return err
			}},
		{"DB_MAX_CONNS", "", "16", "connections in the database pool (open and idle)",
			func(cfg *config, _, v string) error {
				n, err := strconv.Atoi(v)
				if err != nil || n < 1 {
					return fmt.Errorf("must be a positive integer, got %q", v)
				}
				cfg.pool.maxOpen, cfg.pool.maxIdle = n, n
				return nil
			}},
		{"DB_POOLER", "db-pooler", "none", "none for a direct connection; transaction behind a transaction-pooling proxy such as PgBouncer with pool_mode = transaction (then no prepared statements, one round trip per query)",
			func(cfg *config, _, v string) (err error) {
				cfg.pool.transactionPooler, err = parsePooler(v)
				return err
			}},
		{"API_TOKEN", "", "", "if set, every /users request needs Authorization: Bearer <token>",
			func(cfg *config, _, v string) error {
				// HTTP trims header values: such a token could never match.
				if strings.TrimSpace(v) != v {
					return errors.New("must not begin or end with white space")
				}
				cfg.apiToken = v
				return nil
			}},
		{"MAX_CLIENTS", "max-clients", "auto", "client connections held at once; auto: what the file limit allows beside the database pool, at most 4096",
			func(cfg *config, from, v string) error {
				if v == "auto" {
					v, from = "", ""
				}
				cfg.maxClientsSet, cfg.maxClientsFrom = v, from
				return nil
			}},
		{"MAX_STREAMS", "max-streams", strconv.Itoa(defaultMaxStreams), "whole-table GET /users streams served at once; pages and single reads are not counted",
			func(cfg *config, _, v string) error {
				n, err := strconv.Atoi(v)
				if err != nil || n < 1 {
					return fmt.Errorf("must be a positive integer, got %q", v)
				}
				cfg.maxStreams = n
				return nil
			}},
		{"GOMAXPROCS", "", "the CPUs Go finds (a container's limit included), plus 1",
			"how many threads run Go code at once; password hashes may use all but one (read by the Go runtime)", nil},
	}
}

// errPrinted is loadConfig's answer to -h and -version: what was asked for
// is printed, and there is nothing to serve.
var errPrinted = errors.New("printed what was asked for")

// loadConfig reads the configuration: a flag wins over its environment
// variable, which wins over the default. An error names the variable or the
// flag that was wrong. For -h it prints the help to stdout, for -version the
// version, and returns errPrinted.
func loadConfig(args []string, getenv func(string) string, stdout io.Writer) (config, error) {
	cfg := config{pool: poolConfig{maxIdleTime: 5 * time.Minute}}
	all := settings()

	fs := flag.NewFlagSet("users", flag.ContinueOnError)
	// Errors come back as one line; the help is printed only for -h.
	fs.SetOutput(io.Discard)
	given := make(map[string]string) // flag -> value
	for _, st := range all {
		if st.flag != "" {
			fs.Func(st.flag, st.usage, func(v string) error {
				given[st.flag] = v
				return nil
			})
		}
	}
	version := fs.Bool("version", false, "print the version and exit")
	// The flags come first, so that -h and -version work whatever the
	// environment holds.
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printHelp(stdout, all)
			return cfg, errPrinted
		}
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if *version {
		fmt.Fprintln(stdout, versionLine())
		return cfg, errPrinted
	}

	for _, st := range all {
		if st.set != nil && st.def != "" {
			if err := st.set(&cfg, st.env, st.def); err != nil {
				panic(fmt.Sprintf("default of %s: %v", st.env, err)) // settings() is wrong
			}
		}
	}
	for _, st := range all {
		if v := getenv(st.env); st.set != nil && v != "" {
			if err := st.set(&cfg, st.env, v); err != nil {
				return cfg, fmt.Errorf("%s: %w", st.env, err)
			}
		}
	}
	for _, st := range all {
		if v, ok := given[st.flag]; ok {
			if err := st.set(&cfg, "-"+st.flag, v); err != nil {
				return cfg, fmt.Errorf("-%s: %w", st.flag, err)
			}
		}
	}
	var err error
	if cfg.maxClients, err = parseMaxClients(cfg.maxClientsSet, fileLimit(), cfg.pool.maxOpen); err != nil {
		// With MAX_CLIENTS left to auto, it is the pool that leaves no room.
		return cfg, fmt.Errorf("%s: %w", cmp.Or(cfg.maxClientsFrom, "DB_MAX_CONNS"), err)
	}
	// The Go runtime reads GOMAXPROCS, and quietly ignores a bad value.
	if v := getenv("GOMAXPROCS"); v != "" {
		if n, err := strconv.Atoi(v); err != nil || n < 1 {
			return cfg, fmt.Errorf("GOMAXPROCS: must be a positive integer, got %q", v)
		}
	}
	return cfg, nil
}

// parseMaxClients reads MAX_CLIENTS, or picks its default if s is empty:
// as many connections as the file limit allows once the database pool and
// fileReserve have theirs, at most maxDefaultClients. A value the file limit
// cannot hold is an error, since the listener would fail instead.
func parseMaxClients(s string, fileLimit uint64, pool int) (int, error) {
	room := int64(min(fileLimit, 1<<31)) - int64(pool) - fileReserve
	if s == "" {
		if room < 1 {
			return 0, fmt.Errorf("the file limit of %d leaves no room for clients beside %d database connections", fileLimit, pool)
		}
		return int(min(room, maxDefaultClients)), nil
	}
	n, err := strconv.Atoi(s)
	switch {
	case err != nil || n < 1:
		return 0, fmt.Errorf("must be a positive integer, got %q", s)
	case int64(n) > room:
		return 0, fmt.Errorf("the file limit of %d holds at most %d clients beside %d database connections, got %d", fileLimit, max(room, 0), pool, n)
	}
	return n, nil
}

// fileLimit returns how many files the process may open. The Go runtime
// has already raised the soft limit to the hard one.
func fileLimit() uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 1024 // the usual soft limit
	}
	return lim.Cur
}

// printHelp writes what the program is and every setting, with its
// variable, flag and default.
func printHelp(w io.Writer, all []setting) {
	fmt.Fprint(w, `users serves a user-management REST API backed by PostgreSQL.

Usage: users [flags]

Settings come from the environment; a flag, where there is one, wins.

`)
	for _, st := range all {
		name := st.env
		if st.flag != "" {
			name += ", -" + st.flag
		}
		def := cmp.Or(st.def, "none")
		fmt.Fprintf(w, "  %s\n        %s\n        default: %s\n", name, st.usage, def)
	}
	fmt.Fprint(w, `
Other flags:

  -h, -help
        print this help and exit
  -version
        print the version and exit
`)
}

// versionLine returns the program's name, module version, and the VCS
// revision and time it was built from, as far as the build recorded them.
func versionLine() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "users (unknown)"
	}
	return formatVersion(info)
}

// formatVersion returns "users <module version> <revision> <time>", the
// revision cut to 7 characters; what info lacks is left out.
func formatVersion(info *debug.BuildInfo) string {
	parts := []string{"users", info.Main.Version}
	if parts[1] == "" {
		parts[1] = "(devel)"
	}
	for _, key := range []string{"vcs.revision", "vcs.time"} {
		for _, s := range info.Settings {
			if s.Key == key && s.Value != "" {
				v := s.Value
				if key == "vcs.revision" && len(v) > 7 {
					v = v[:7]
				}
				parts = append(parts, v)
			}
		}
	}
	return strings.Join(parts, " ")
}

// parsePooler reads DB_POOLER: it reports whether a transaction pooler
// stands between the service and PostgreSQL. A session pooler keeps a
// server connection per client connection, so it is "none" to the service.
func parsePooler(s string) (transactionPooler bool, err error) {
	switch s {
	case "none":
		return false, nil
	case "transaction":
		return true, nil
	}
	return false, fmt.Errorf(`must be "none" or "transaction", got %q`, s)
}

func parseBcryptCost(s string) (int, error) {
	cost, err := strconv.Atoi(s)
	if err != nil || cost < 10 || cost > 15 {
		return 0, fmt.Errorf("must be an integer from 10 to 15, got %q", s)
	}
	return cost, nil
}

// run starts the service and blocks until ctx is cancelled or the process
// gets SIGINT or SIGTERM, then shuts it down gracefully. It returns an error
// if the service cannot start.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := loadConfig(args, getenv, stdout)
	if errors.Is(err, errPrinted) {
		return nil
	}
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(stdout, nil))

	dsn, err := parseDatabaseURL(cfg.databaseURL)
	if err != nil {
		return fmt.Errorf("%s: %w", cfg.databaseURLFrom, err)
	}
	startCtx, cancel := context.WithTimeout(ctx, connectTimeout)
	st, err := openStore(startCtx, dsn, cfg.pool, queryTimeout)
	cancel()
	if err != nil {
		// lib/pq puts each host's error on a line of its own.
		cause := strings.NewReplacer(":\n", ": ", "\n", "; ").Replace(redactURLError(err).Error())
		return fmt.Errorf("%s: cannot use the database at %s: %s", cfg.databaseURLFrom, databaseAddr(dsn), cause)
	}
	defer st.Close()

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return fmt.Errorf("%s: %w", cfg.addrFrom, err)
	}
	if cfg.apiToken == "" && !isLoopback(ln.Addr()) {
		logger.Warn("API_TOKEN is not set: anyone who can reach this address can read and change users", "addr", ln.Addr().String())
	}

	// Hashes may run on every P but one (see main). A hash holds its P for
	// a long time, and the Go scheduler takes it back only every 10 ms:
	// were every P hashing, each step of a read would wait that long.
	hashSlots := max(1, runtime.GOMAXPROCS(0)-1)
	h := newHasher(cfg.bcryptCost, hashSlots, hashWait)
	opts := serverOptions{
		maxStreams:  cfg.maxStreams,
		streamStall: streamStall,
		// Without a token, a loopback address is the only guard: keep web
		// pages out that reach it through a name of their own (DNS
		// rebinding).
		loopbackHostsOnly: cfg.apiToken == "" && isLoopback(ln.Addr()),
	}
	srv := newHTTPServer(newServer(logger, st, h, cfg.apiToken, opts), logger)
	clients := limitClients(srv, ln, cfg.maxClients, logger)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(clients) }()
	logger.Info("listening", "addr", ln.Addr().String(), databaseAttr(dsn), "bcrypt_cost", cfg.bcryptCost,
		"max_clients", cfg.maxClients, "max_streams", cfg.maxStreams)

	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}
	// From here a second signal stops the process at once, as it would
	// any program.
	stop()
	logger.Info("shutting down", "timeout", shutdownTimeout)
	// ctx is already cancelled, so the wait needs a context of its own.
	shutdownCtx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	logger.Info("stopped")
	return nil
}

// newHTTPServer returns the server for handler, with the service's timeouts
// and limits.
func newHTTPServer(handler http.Handler, logger *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		// "OPTIONS *" comes to the handler, which answers it as JSON like
		// any other path it does not serve.
		DisableGeneralOptionsHandler: true,
		ErrorLog:                     slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		ConnContext:                  func(ctx context.Context, c net.Conn) context.Context { limitUnsent(c); return ctx },
	}
}

// limitUnsent caps what c's socket holds unsent, on Linux. A writer blocked
// on a full send buffer wakes only once a third of it is free, megabytes on
// a fast link: a client reading slowly would look stalled for that long.
// With the cap, the writer wakes as the client reads.
func limitUnsent(c net.Conn) {
	const tcpNotSentLowat, maxUnsent = 0x19, 128 << 10
	if sc, ok := c.(syscall.Conn); ok && runtime.GOOS == "linux" {
		if raw, err := sc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpNotSentLowat, maxUnsent) })
		}
	}
}

// databaseAddr returns every host and port that databaseURL names, for
// error messages: never the whole URL, which may hold a password.
func databaseAddr(databaseURL string) string {
	cfg, err := pq.NewConfig(databaseURL)
	if err != nil {
		return "(unparsable DATABASE_URL)"
	}
	addrs := []string{net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))}
	for _, m := range cfg.Multi {
		addrs = append(addrs, net.JoinHostPort(m.Host, strconv.Itoa(int(m.Port))))
	}
	return strings.Join(addrs, ", ")
}

// parseDatabaseURL reads DATABASE_URL and returns it as the key=value
// settings lib/pq reads. It accepts a postgres:// or postgresql:// URL, the
// scheme in any case, with one host or several for failover
// (postgres://h1:p1,h2:p2/db, or postgres://h1,h2/db?port=p1,p2, as libpq
// reads them), or key=value settings (host=h1,h2 port=p1,p2 dbname=db).
// Whitespace around the value, and one pair of quotes around it (as
// docker --env-file keeps them), are ignored. A value that looks like a
// URL is read as a URL or refused, never as key=value settings: lib/pq
// would quote it whole in an error, or send it to the server as a setting.
// The errors never hold any part of the value, which may hold a password.
func parseDatabaseURL(value string) (string, error) {
	s := strings.TrimSpace(value)
	if len(s) >= 2 && (s[0] == '"' || s[0] == '\'') && s[len(s)-1] == s[0] {
		s = strings.TrimSpace(s[1 : len(s)-1])
	}
	var kvs []connSetting
	var err error
	if urlScheme.MatchString(s) {
		kvs, err = parsePostgresURL(s)
	} else {
		kvs, err = parseSettings(s)
	}
	if err != nil {
		return "", fmt.Errorf("%w (the value is not shown, as it may hold a password)", err)
	}
	var password string
	dsn := make([]string, len(kvs))
	for i, kv := range kvs {
		if kv.key == "password" {
			password = kv.value
		}
		// libpq reads a whole connection string in dbname, lib/pq does
		// not: it would send it to the server as a name, password and all,
		// and print it in an error.
		if kv.key != "password" && strings.Contains(kv.value, "://") {
			return "", fmt.Errorf("the setting %s holds a URL: give the URL itself (the value is not shown, as it may hold a password)", kv.key)
		}
		dsn[i] = kv.key + "=" + quoteSetting(kv.value)
	}
	if _, err := pq.NewConfig(strings.Join(dsn, " ")); err != nil {
		if password != "" && strings.Contains(err.Error(), password) {
			return "", errors.New("lib/pq refuses a setting (the value is not shown, as it may hold a password)")
		}
		return "", err
	}
	return strings.Join(dsn, " "), nil
}

// urlScheme matches the start of anything that looks like a URL.
var urlScheme = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*:`)

// settingKey is what a libpq keyword or a PostgreSQL setting looks like.
var settingKey = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.]*$`)

// connSetting is one key=value connection setting.
type connSetting struct{ key, value string }

// parsePostgresURL reads a postgres:// URL into settings, hosts and ports
// first. Go's net/url cannot read a list of hosts with ports, so the
// authority is read here.
func parsePostgresURL(s string) ([]connSetting, error) {
	scheme, rest, _ := strings.Cut(s, ":")
	if scheme = strings.ToLower(scheme); scheme != "postgres" && scheme != "postgresql" {
		return nil, errors.New("the URL's scheme must be postgres:// or postgresql://")
	}
	rest, ok := strings.CutPrefix(rest, "//")
	if !ok {
		return nil, errors.New("a postgres URL must start with postgres://")
	}
	if strings.Contains(rest, "#") {
		return nil, errors.New("the URL holds a '#'; write it as %23")
	}
	authority, tail := rest, ""
	if i := strings.IndexAny(rest, "/?"); i >= 0 {
		authority, tail = rest[:i], rest[i:]
	}
	if strings.Contains(tail, "@") {
		// Most likely a password with a '/' or '?': read as it stands, its
		// start would be taken for a host and port, and shown in errors.
		return nil, errors.New("the URL holds an '@' after its host; write '/', '?' and '@' in a password as %2F, %3F and %40")
	}
	var kvs []connSetting
	hostList := authority
	if i := strings.LastIndex(authority, "@"); i >= 0 {
		userinfo := authority[:i]
		hostList = authority[i+1:]
		user, password, _ := strings.Cut(userinfo, ":")
		for _, kv := range []connSetting{{"user", user}, {"password", password}} {
			v, err := url.PathUnescape(kv.value)
			if err != nil {
				return nil, errors.New("the URL's user or password has a malformed %-escape")
			}
			if v != "" {
				kvs = append(kvs, connSetting{kv.key, v})
			}
		}
	}
	hosts, ports, err := parseHostList(hostList)
	if err != nil {
		return nil, err
	}
	if hosts != "" {
		kvs = append(kvs, connSetting{"host", hosts})
	}
	if ports != "" {
		kvs = append(kvs, connSetting{"port", ports})
	}
	path, query, _ := strings.Cut(tail, "?")
	if path = strings.TrimPrefix(path, "/"); path != "" {
		dbname, err := url.PathUnescape(path)
		if err != nil {
			return nil, errors.New("the URL's database name has a malformed %-escape")
		}
		kvs = append(kvs, connSetting{"dbname", dbname})
	}
	params, err := url.ParseQuery(query)
	if err != nil {
		return nil, errors.New("the URL's query is malformed")
	}
	keys := slices.Sorted(maps.Keys(params))
	for _, k := range keys {
		if !settingKey.MatchString(k) {
			return nil, errors.New("the URL's query has a parameter that is not a setting name")
		}
		if len(params[k]) > 1 {
			return nil, errors.New("the URL's query gives a parameter more than once")
		}
		// A parameter overrides the same setting from the authority, as
		// in libpq: lib/pq reads the last one given.
		kvs = append(kvs, connSetting{k, params[k][0]})
	}
	return kvs, nil
}

// parseHostList reads the hosts of a URL, host[:port] or [IPv6][:port]
// separated by commas, into lib/pq's host and port lists. A host given
// without a port gets 5432 if another has one.
func parseHostList(list string) (hosts, ports string, err error) {
	if list == "" {
		return "", "", nil
	}
	var hs, ps []string
	anyPort := false
	for _, item := range strings.Split(list, ",") {
		host, port := item, ""
		if strings.HasPrefix(item, "[") {
			end := strings.Index(item, "]")
			if end < 0 {
				return "", "", errors.New("the URL has a host with '[' and no ']'")
			}
			host, port = item[1:end], item[end+1:]
			if port != "" && port[0] != ':' {
				return "", "", errors.New("the URL has a malformed host")
			}
			port = strings.TrimPrefix(port, ":")
		} else if i := strings.LastIndex(item, ":"); i >= 0 {
			host, port = item[:i], item[i+1:]
			if strings.Contains(host, ":") {
				return "", "", errors.New("the URL has an IPv6 address without [ ]")
			}
		}
		h, err := url.PathUnescape(host)
		if err != nil || h == "" || strings.ContainsAny(h, ", \t\n'\\") {
			return "", "", errors.New("the URL has an empty or malformed host")
		}
		if port != "" {
			if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || port[0] < '0' || port[0] > '9' {
				return "", "", errors.New("the URL has a port that is not a number from 1 to 65535")
			}
			anyPort = true
		}
		hs, ps = append(hs, h), append(ps, port)
	}
	if !anyPort {
		return strings.Join(hs, ","), "", nil
	}
	for i, p := range ps {
		if p == "" {
			ps[i] = "5432"
		}
	}
	return strings.Join(hs, ","), strings.Join(ps, ","), nil
}

// parseSettings reads key=value settings as lib/pq does (values in single
// quotes, or unquoted with backslash escapes), but refuses a key that is
// not a setting name or a word without its '=': lib/pq would quote such a
// word in its error, and a stray word is often part of a password.
func parseSettings(s string) ([]connSetting, error) {
	var kvs []connSetting
	r := []rune(s)
	i := 0
	skipSpace := func() {
		for i < len(r) && unicode.IsSpace(r[i]) {
			i++
		}
	}
	for skipSpace(); i < len(r); skipSpace() {
		start := i
		for i < len(r) && !unicode.IsSpace(r[i]) && r[i] != '=' {
			i++
		}
		key := string(r[start:i])
		skipSpace()
		if !settingKey.MatchString(key) || i == len(r) || r[i] != '=' {
			return nil, errors.New("not a postgres:// URL, nor key=value settings")
		}
		i++
		skipSpace()
		var v []rune
		if i < len(r) && r[i] == '\'' {
			for i++; ; i++ {
				if i == len(r) {
					return nil, errors.New("a quoted value in the key=value settings has no closing quote")
				}
				if r[i] == '\\' && i+1 < len(r) {
					i++
				} else if r[i] == '\'' {
					i++
					break
				}
				v = append(v, r[i])
			}
		} else {
			for ; i < len(r) && !unicode.IsSpace(r[i]); i++ {
				if r[i] == '\\' {
					if i++; i == len(r) {
						return nil, errors.New("the key=value settings end with a backslash")
					}
				}
				v = append(v, r[i])
			}
		}
		kvs = append(kvs, connSetting{key, string(v)})
	}
	if len(kvs) == 0 {
		return nil, errors.New("is empty")
	}
	return kvs, nil
}

// quoteSetting quotes a value for lib/pq's key=value settings.
func quoteSetting(v string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

// databaseAttr names the database that dsn, the settings parseDatabaseURL
// returns, opens, for the start
// log: its host, port and name, never its password.
func databaseAttr(dsn string) slog.Attr {
	cfg, err := pq.NewConfig(dsn)
	if err != nil {
		return slog.String("database", "(unparsable)")
	}
	hosts, ports := []string{cfg.Host}, []string{strconv.Itoa(int(cfg.Port))}
	for _, m := range cfg.Multi {
		hosts, ports = append(hosts, m.Host), append(ports, strconv.Itoa(int(m.Port)))
	}
	return slog.Group("database", "host", strings.Join(hosts, ","), "port", strings.Join(ports, ","), "name", cfg.Database)
}

// redactURLError drops the URL that a *url.Error quotes, since a connection
// URL may carry a password.
func redactURLError(err error) error {
	var urlErr *url.Error
	if errors.As(err, &urlErr) {
		return urlErr.Err
	}
	return err
}

func isLoopback(addr net.Addr) bool {
	tcp, ok := addr.(*net.TCPAddr)
	return ok && tcp.IP.IsLoopback()
}

// clientLimiter is a listener that holds at most max client connections at
// once. When a new one would be one too many, the connection idle longest is
// closed to make room: a keep-alive connection waiting for its next request,
// or one that has not sent a whole request yet. If every connection is busy
// with a request, the new one is answered 503 and closed.
type clientLimiter struct {
	net.Listener
	max    int
	logger *slog.Logger

	mu         sync.Mutex
	conns      map[net.Conn]*list.Element // in idle, or nil while busy
	idle       *list.List                 // of net.Conn, idle longest first
	lastWarned time.Time

	refusing chan struct{} // a slot for each refusal being written
}

// limitClients makes srv hold at most max connections from ln, and returns
// the listener srv must serve.
func limitClients(srv *http.Server, ln net.Listener, max int, logger *slog.Logger) net.Listener {
	l := &clientLimiter{Listener: ln, max: max, logger: logger,
		conns: make(map[net.Conn]*list.Element), idle: list.New(), refusing: make(chan struct{}, fileReserve/2)}
	srv.ConnState = l.track
	return l
}

// Accept returns the next connection there is room for.
func (l *clientLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.admit(c) {
			return c, nil
		}
		l.refuse(c)
	}
}

// admit makes room for c, closing the connection idle longest if need be,
// and reports whether it could.
func (l *clientLimiter) admit(c net.Conn) bool {
	l.mu.Lock()
	var evicted net.Conn
	if len(l.conns) >= l.max {
		oldest := l.idle.Front()
		if oldest == nil {
			l.mu.Unlock()
			return false
		}
		evicted = l.idle.Remove(oldest).(net.Conn)
		delete(l.conns, evicted)
	}
	// Until it has sent a whole request, a connection counts as idle.
	l.conns[c] = l.idle.PushBack(c)
	l.mu.Unlock()
	if evicted != nil {
		evicted.Close()
	}
	return true
}

// track follows each connection's state, as http.Server reports it.
func (l *clientLimiter) track(c net.Conn, state http.ConnState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.conns[c]
	if !ok {
		return // closed to make room, or refused
	}
	if e != nil {
		l.idle.Remove(e)
	}
	switch state {
	case http.StateNew, http.StateIdle:
		l.conns[c] = l.idle.PushBack(c)
	case http.StateActive:
		l.conns[c] = nil
	case http.StateClosed, http.StateHijacked:
		delete(l.conns, c)
	}
}

// busyAnswer is what a connection gets when there is no room for it.
const busyAnswer = "HTTP/1.1 503 Service Unavailable\r\n" +
	"Content-Type: application/json\r\n" +
	"Retry-After: 1\r\n" +
	"Connection: close\r\n" +
	"Cache-Control: no-store\r\n" +
	"X-Content-Type-Options: nosniff\r\n" +
	"Content-Length: 33\r\n" +
	"\r\n" +
	`{"detail":"Service unavailable"}` + "\n"

// refuse answers c 503 and closes it. Closing a connection with unread data
// resets it, and the client may lose the answer: so after the answer, what
// the client sends is read and dropped, for up to a second while few
// refusals are under way, and otherwise only what has already come.
func (l *clientLimiter) refuse(c net.Conn) {
	l.mu.Lock()
	if time.Since(l.lastWarned) >= time.Second {
		l.lastWarned = time.Now()
		l.logger.Warn("every client connection is busy: refusing new ones", "max_clients", l.max)
	}
	l.mu.Unlock()
	// A new connection's send buffer is empty: the write does not wait.
	c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := io.WriteString(c, busyAnswer); err != nil {
		c.Close()
		return
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
	drain := func(wait time.Duration) {
		c.SetReadDeadline(time.Now().Add(wait))
		io.Copy(io.Discard, io.LimitReader(c, maxHeaderBytes))
		c.Close()
	}
	select {
	case l.refusing <- struct{}{}:
		go func() {
			defer func() { <-l.refusing }()
			drain(time.Second)
		}()
	default:
		drain(time.Millisecond)
	}
}

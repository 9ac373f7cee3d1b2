package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lib/pq"
)

const (
	defaultAddr        = "127.0.0.1:8000"
	defaultDatabaseURL = "postgres://localhost:5432/postgres?sslmode=disable"
	defaultBcryptCost  = 12
	// defaultMaxStreams is how many whole-table list streams are served at
	// once, unless MAX_STREAMS says otherwise.
	defaultMaxStreams = 32
)

// config is everything the service reads from its environment and flags.
type config struct {
	addr        string
	databaseURL string // as lib/pq reads it: see parseDatabaseURL
	bcryptCost  int
	apiToken    string
	pool        poolConfig
	maxClients  int
	maxStreams  int
	proxies     []netip.Prefix
	jsonLogs    bool

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
	// set applies value; from is the variable or the flag that gave it.
	set func(cfg *config, from, value string) error
}

// settings lists every setting, in the order loadConfig applies them: the
// defaults, then the environment, then the flags, each in this order (so
// ADDR, after PORT, wins over it).
func settings() []setting {
	return []setting{
		{"DATABASE_URL", "database-url", defaultDatabaseURL, "PostgreSQL connection URL (postgres://...; several hosts as h1:p1,h2:p2) or key=value settings; put a password here, not in the flag, which anyone who lists processes can read",
			func(cfg *config, from, v string) (err error) {
				cfg.databaseURL, err = parseDatabaseURL(v)
				cfg.databaseURLFrom = from
				return err
			}},
		{"PORT", "", "", "if ADDR is not set, listen on :PORT (as hosting platforms expect)",
			func(cfg *config, from, v string) error {
				_, err := atoi(v, 1, 65535)
				cfg.addr, cfg.addrFrom = ":"+v, from
				return err
			}},
		{"ADDR", "addr", defaultAddr, "address to listen on",
			func(cfg *config, from, v string) error {
				cfg.addr, cfg.addrFrom = v, from
				return nil
			}},
		{"BCRYPT_COST", "bcrypt-cost", strconv.Itoa(defaultBcryptCost), "bcrypt cost, 10 to 15; each step doubles the time a hash takes",
			intSetting(10, 15, func(cfg *config) *int { return &cfg.bcryptCost })},
		{"DB_MAX_CONNS", "", "16", "connections in the database pool (open and idle)",
			intSetting(1, 0, func(cfg *config) *int { return &cfg.pool.maxOpen })},
		{"DB_POOLER", "db-pooler", "none", "none for a direct connection; transaction behind a transaction-pooling proxy such as PgBouncer with pool_mode = transaction (then no prepared statements, one round trip per query)",
			func(cfg *config, _, v string) error {
				// A session pooler keeps a server connection per client
				// connection, so it is "none" to the service.
				if v != "none" && v != "transaction" {
					return fmt.Errorf(`must be "none" or "transaction", got %q`, v)
				}
				cfg.pool.transactionPooler = v == "transaction"
				return nil
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
		{"MAX_CLIENTS", "max-clients", "auto", "client connections held at once; auto: half the file limit, at most 4096",
			func(cfg *config, _, v string) (err error) {
				if v == "auto" {
					cfg.maxClients = int(min(fileLimit()/2, 4096))
					return nil
				}
				cfg.maxClients, err = atoi(v, 1, 0)
				return err
			}},
		{"MAX_STREAMS", "max-streams", strconv.Itoa(defaultMaxStreams), "whole-table GET /users streams served at once; pages and single reads are not counted",
			intSetting(1, 0, func(cfg *config) *int { return &cfg.maxStreams })},
		{"TRUSTED_PROXIES", "", "", "comma-separated CIDRs of reverse proxies whose X-Forwarded-For names the client, for the sign-in throttles and the log",
			func(cfg *config, _, v string) (err error) {
				cfg.proxies, err = parseCIDRs(v)
				return err
			}},
		{"LOG_FORMAT", "log-format", "text", "text for logfmt lines, json for one JSON object per line",
			func(cfg *config, _, v string) error {
				if v != "text" && v != "json" {
					return fmt.Errorf(`must be "text" or "json", got %q`, v)
				}
				cfg.jsonLogs = v == "json"
				return nil
			}},
		// The Go runtime reads GOMAXPROCS, and quietly ignores a bad value.
		{"GOMAXPROCS", "", "", "how many threads run Go code at once (default: the CPUs Go finds, a container's limit included, plus 1); password hashes may use all but one",
			func(_ *config, _, v string) error {
				_, err := atoi(v, 1, 0)
				return err
			}},
	}
}

// atoi reads an integer from lo to hi, or from lo up if hi is 0.
func atoi(s string, lo, hi int) (int, error) {
	n, err := strconv.Atoi(s)
	switch {
	case err == nil && n >= lo && (n <= hi || hi == 0):
		return n, nil
	case hi == 0:
		return 0, fmt.Errorf("must be an integer from %d up, got %q", lo, s)
	}
	return 0, fmt.Errorf("must be an integer from %d to %d, got %q", lo, hi, s)
}

// intSetting returns a setting's set that stores an integer from lo to hi
// (see atoi) in the field that field returns.
func intSetting(lo, hi int, field func(*config) *int) func(*config, string, string) error {
	return func(cfg *config, _, v string) (err error) {
		*field(cfg), err = atoi(v, lo, hi)
		return err
	}
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
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		printHelp(stdout, all)
		return cfg, errPrinted
	} else if err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if *version {
		// Go stamps the module version, or for a commit without a tag a
		// pseudo-version that names it, into the build.
		v := "(devel)"
		if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" {
			v = info.Main.Version
		}
		fmt.Fprintln(stdout, "users", v)
		return cfg, errPrinted
	}

	for pass := range 3 {
		for _, st := range all {
			v, from := st.def, st.env
			switch pass {
			case 1:
				v = getenv(st.env)
			case 2:
				v, from = given[st.flag], "-"+st.flag
			}
			if v == "" {
				continue
			}
			if err := st.set(&cfg, from, v); err != nil {
				return cfg, fmt.Errorf("%s: %w", from, err)
			}
		}
	}
	cfg.pool.maxIdle = cfg.pool.maxOpen
	return cfg, nil
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
		fmt.Fprintf(w, "  %s\n        %s\n", name, st.usage)
		if st.def != "" {
			fmt.Fprintf(w, "        default: %s\n", st.def)
		}
	}
	fmt.Fprint(w, `
Other flags:

  -h, -help
        print this help and exit
  -version
        print the version and exit
`)
}

// errHidden ends every DATABASE_URL error, whose value is never shown.
const errHidden = " (the value is not shown, as it may hold a password)"

// parseDatabaseURL returns DATABASE_URL as lib/pq reads it: a postgres://
// URL (the scheme in any case) or key=value settings, without the white
// space and the one pair of quotes around it that docker --env-file keeps.
// lib/pq misreads several hosts with ports in a URL (h1:p1,h2:p2), so they
// are rewritten as ?host=h1,h2&port=p1,p2. The errors never show the value.
func parseDatabaseURL(value string) (string, error) {
	s := strings.TrimSpace(value)
	if len(s) >= 2 && (s[0] == '"' || s[0] == '\'') && s[len(s)-1] == s[0] {
		s = strings.TrimSpace(s[1 : len(s)-1])
	}
	if scheme, rest, ok := strings.Cut(s, "://"); ok && (strings.EqualFold(scheme, "postgres") || strings.EqualFold(scheme, "postgresql")) {
		end := len(rest)
		if i := strings.IndexAny(rest, "/?#"); i >= 0 {
			end = i
		}
		// An '@' past the host is a password with a '/', '?' or '#': read
		// as it stands, its start would be taken for a host and port.
		if strings.Contains(rest[end:], "@") {
			return "", errors.New("the URL holds an '@' after its host: write '/', '?', '#' and '@' in a password as %2F, %3F, %23 and %40" + errHidden)
		}
		s = "postgres://" + hostsAsQuery(rest, strings.LastIndex(rest[:end], "@")+1, end)
	}
	cfg, err := pq.NewConfig(s)
	switch {
	case err != nil: // lib/pq's errors quote the value
		return "", errors.New("lib/pq cannot read it: see https://pkg.go.dev/github.com/lib/pq" + errHidden)
	case strings.Contains(cfg.Database, "=") || strings.Contains(cfg.Database, "://"):
		// libpq reads such a name as more settings; lib/pq would send it to
		// the server as a name, password and all.
		return "", errors.New("the database name holds connection settings: give them as settings of their own" + errHidden)
	}
	return s, nil
}

// hostsAsQuery returns rest, a URL after its scheme whose hosts are
// rest[from:to], with a list of hosts moved to the query, as lib/pq reads
// it: u@h1:p1,[::1]/db as u@/db?port=p1,5432&host=h1,::1&..., and so a
// socket directory, %2Ftmp.
func hostsAsQuery(rest string, from, to int) string {
	list := rest[from:to]
	if !strings.ContainsAny(list, ",%") { // Go's URLs refuse escapes in a host
		return rest
	}
	var hosts, ports []string
	anyPort := false
	for _, h := range strings.Split(list, ",") {
		port := "5432"
		if i := strings.LastIndex(h, ":"); i > strings.LastIndex(h, "]") {
			h, port, anyPort = h[:i], h[i+1:], true
		}
		hosts, ports = append(hosts, strings.Trim(h, "[]")), append(ports, port)
	}
	path, query, _ := strings.Cut(rest[to:], "?")
	query = "host=" + strings.Join(hosts, ",") + "&" + query
	if anyPort {
		query = "port=" + strings.Join(ports, ",") + "&" + query
	}
	return rest[:from] + path + "?" + query
}

// databaseAttr names the database that dsn, as parseDatabaseURL returns it,
// opens, for the log and errors: its hosts, ports and name, never its
// password.
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

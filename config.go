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
	defaultDatabaseURL = "postgres://localhost:5432/postgres?sslmode=disable"
	defaultBcryptCost  = 12
	defaultMaxStreams  = 32
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
	// What gave addr and databaseURL, for run's errors.
	addrFrom, databaseURLFrom string
}

// setting is an environment variable and, unless flag is "", a flag that wins
// over it. set applies a value given by from, the variable or the flag.
type setting struct {
	env, flag, def, usage string
	set                   func(from, value string) error
}

// settings lists cfg's settings in the order loadConfig applies them (ADDR, after PORT, wins).
func (cfg *config) settings() []setting {
	return []setting{
		{"DATABASE_URL", "database-url", defaultDatabaseURL, "PostgreSQL connection URL (postgres://...; several hosts as h1:p1,h2:p2) or key=value settings; put a password here, not in the flag, which anyone who lists processes can read", func(from, v string) (err error) {
			cfg.databaseURLFrom = from
			cfg.databaseURL, err = parseDatabaseURL(v)
			return err
		}},
		{"PORT", "", "", "if ADDR is not set, listen on :PORT (as hosting platforms expect)", func(from, v string) error {
			cfg.addr, cfg.addrFrom = ":"+v, from
			return intIn(new(int), 1, 65535)(from, v)
		}},
		{"ADDR", "addr", "127.0.0.1:8000", "address to listen on", func(from, v string) error {
			cfg.addr, cfg.addrFrom = v, from
			return nil
		}},
		{"BCRYPT_COST", "bcrypt-cost", strconv.Itoa(defaultBcryptCost), "bcrypt cost, 10 to 15; each step doubles the time a hash takes", intIn(&cfg.bcryptCost, 10, 15)},
		{"DB_MAX_CONNS", "", "16", "connections in the database pool (open and idle)", intIn(&cfg.pool.maxOpen, 1, 0)},
		{"DB_POOLER", "db-pooler", "none", "none for a direct connection; transaction behind a transaction-pooling proxy such as PgBouncer with pool_mode = transaction (then no prepared statements, one round trip per query)", either(&cfg.pool.transactionPooler, "none", "transaction")},
		{"API_TOKEN", "", "", "if set, every /users request needs Authorization: Bearer <token>", func(_, v string) error {
			cfg.apiToken = v
			if strings.TrimSpace(v) != v { // HTTP trims header values: it could never match
				return errors.New("must not begin or end with white space")
			}
			return nil
		}},
		{"MAX_CLIENTS", "max-clients", "auto", "client connections held at once; auto: half the file limit, at most 4096", func(from, v string) error {
			if v != "auto" {
				return intIn(&cfg.maxClients, 1, 0)(from, v)
			}
			lim := syscall.Rlimit{Cur: 1024} // the file limit, which Go raised to the hard one
			syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
			cfg.maxClients = int(min(lim.Cur/2, 4096))
			return nil
		}},
		{"MAX_STREAMS", "max-streams", strconv.Itoa(defaultMaxStreams), "whole-table GET /users streams served at once; pages and single reads are not counted", intIn(&cfg.maxStreams, 1, 0)},
		{"TRUSTED_PROXIES", "", "", "comma-separated CIDRs of reverse proxies whose X-Forwarded-For names the client, for the sign-in throttles and the log", func(_, v string) (err error) {
			cfg.proxies, err = parseCIDRs(v)
			return err
		}},
		{"LOG_FORMAT", "log-format", "text", "text for logfmt lines, json for one JSON object per line", either(&cfg.jsonLogs, "text", "json")},
		// The Go runtime reads GOMAXPROCS, and quietly ignores a bad value.
		{"GOMAXPROCS", "", "", "how many threads run Go code at once (default: the CPUs Go finds, a container's limit included); password hashes use all but one", intIn(new(int), 1, 0)},
	}
}

// intIn returns a set that stores in p an integer from lo to hi (or up, if hi is 0).
func intIn(p *int, lo, hi int) func(from, value string) error {
	return func(_, s string) error {
		n, err := strconv.Atoi(s)
		switch {
		case err == nil && n >= lo && (n <= hi || hi == 0):
			*p = n
			return nil
		case hi == 0:
			return fmt.Errorf("must be an integer from %d up, got %q", lo, s)
		}
		return fmt.Errorf("must be an integer from %d to %d, got %q", lo, hi, s)
	}
}

// either returns a set that takes no or yes, and stores in p whether it was yes.
func either(p *bool, no, yes string) func(from, value string) error {
	return func(_, v string) error {
		*p = v == yes
		if v != no && v != yes {
			return fmt.Errorf("must be %q or %q, got %q", no, yes, v)
		}
		return nil
	}
}

// errPrinted is loadConfig's answer to -h and -version, once printed.
var errPrinted = errors.New("printed what was asked for")

// loadConfig reads the settings; an error names the variable or flag at fault.
// For -h it prints the help, for -version the version, and returns errPrinted.
func loadConfig(args []string, getenv func(string) string, stdout io.Writer) (config, error) {
	cfg := config{pool: poolConfig{maxIdleTime: 5 * time.Minute}}
	all := cfg.settings()
	fs := flag.NewFlagSet("users", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors come back as one line
	for _, st := range all {
		if st.flag != "" {
			fs.String(st.flag, "", st.usage)
		}
	}
	version := fs.Bool("version", false, "print the version and exit")
	// Flags first, so that -h and -version work whatever the environment holds.
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		printHelp(stdout, all)
		return cfg, errPrinted
	} else if err != nil {
		return cfg, err
	}
	given := make(map[string]string) // flag -> value
	fs.Visit(func(f *flag.Flag) { given[f.Name] = f.Value.String() })
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if *version {
		v := "(devel)" // Go stamps the module version, or a pseudo-version naming the commit
		if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" {
			v = info.Main.Version
		}
		fmt.Fprintln(stdout, "users", v)
		return cfg, errPrinted
	}
	for pass := range 3 { // the defaults, the environment, the flags
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
			if err := st.set(from, v); err != nil {
				return cfg, fmt.Errorf("%s: %w", from, err)
			}
		}
	}
	cfg.pool.maxIdle = cfg.pool.maxOpen
	return cfg, nil
}

// printHelp writes what the program is and every setting.
func printHelp(w io.Writer, all []setting) {
	fmt.Fprint(w, "users serves a user-management REST API backed by PostgreSQL.\n\n")
	fmt.Fprint(w, "Usage: users [flags]\n\nSettings come from the environment; a flag, where there is one, wins.\n\n")
	all = append(all, setting{env: "-h, -help", usage: "print this help and exit"},
		setting{env: "-version", usage: "print the version and exit"})
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
}

// errHidden ends every DATABASE_URL error: the value may hold a password.
const errHidden = " (the value is not shown, as it may hold a password)"

// parseDatabaseURL returns DATABASE_URL as lib/pq reads it, without the space
// and quotes around it that docker --env-file keeps, and with a URL's hosts
// moved to its query (lib/pq misreads h1:p1,h2:p2). Its errors never show it.
func parseDatabaseURL(value string) (string, error) {
	s := strings.TrimSpace(value)
	if len(s) >= 2 && (s[0] == '"' || s[0] == '\'') && s[len(s)-1] == s[0] {
		s = strings.TrimSpace(s[1 : len(s)-1])
	}
	if scheme, rest, ok := strings.Cut(s, "://"); ok && (strings.EqualFold(scheme, "postgres") || strings.EqualFold(scheme, "postgresql")) {
		end := strings.IndexAny(rest+"/", "/?#")        // where the hosts end
		start := strings.LastIndex(rest[:end], "@") + 1 // and start
		// An '@' past the host: a password with '/', '?' or '#', read as a host.
		if strings.Contains(rest[end:], "@") {
			return "", errors.New("the URL holds an '@' after its host: write '/', '?', '#' and '@' in a password as %2F, %3F, %23 and %40" + errHidden)
		}
		s = "postgres://" + rest[:start] + hostsAsQuery(rest[start:end], rest[end:])
	}
	cfg, err := pq.NewConfig(s)
	switch {
	case err != nil: // lib/pq's errors quote the value
		return "", errors.New("lib/pq cannot read it: see https://pkg.go.dev/github.com/lib/pq" + errHidden)
	case strings.Contains(cfg.Database, "=") || strings.Contains(cfg.Database, "://"):
		// libpq reads it as settings; lib/pq would send it, password and all.
		return "", errors.New("the database name holds connection settings: give them as settings of their own" + errHidden)
	}
	return s, nil
}

// hostsAsQuery returns a URL's hosts and path, a list of hosts or a socket
// directory moved to the query: h1:p1,[::1] and /db as /db?port=p1,5432&host=h1,::1.
func hostsAsQuery(hosts, path string) string {
	if !strings.ContainsAny(hosts, ",%") { // Go's URLs refuse escapes in a host
		return hosts + path
	}
	var names, ports []string
	anyPort := false
	for _, h := range strings.Split(hosts, ",") {
		port := "5432"
		if i := strings.LastIndex(h, ":"); i > strings.LastIndex(h, "]") {
			h, port, anyPort = h[:i], h[i+1:], true
		}
		names, ports = append(names, strings.Trim(h, "[]")), append(ports, port)
	}
	path, query, _ := strings.Cut(path, "?")
	query = "host=" + strings.Join(names, ",") + "&" + query
	if anyPort {
		query = "port=" + strings.Join(ports, ",") + "&" + query
	}
	return path + "?" + query
}

// databaseAttr names dsn's database for logs and errors: hosts, ports and name, never the password.
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

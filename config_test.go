package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"reflect"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lib/pq"
)

// TestRunRefusesBadConfiguration checks that run refuses what it cannot use
// with one line that starts with the setting, named as it was given (the
// flag if it came from a flag), and shows no password: each value here
// that holds one holds hunter2.
func TestRunRefusesBadConfiguration(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	down, other := closedAddr(t), closedAddr(t)
	downURL := "postgres://ann:hunter2@" + down + "/db?sslmode=disable"
	downHost, downPort, _ := net.SplitHostPort(down)
	_, otherPort, _ := net.SplitHostPort(other)
	cannotUse := "cannot use the database [host=" + downHost + " port=" + downPort + " name=db]: "
	type env = map[string]string
	tests := []struct {
		name  string
		env   env
		args  []string
		want  string   // the error's start
		wants []string // also in the error
	}{
		{"cost not a number", env{"BCRYPT_COST": "twelve"}, nil, "BCRYPT_COST: ", []string{`"twelve"`}},
		{"cost too low", env{"BCRYPT_COST": "9"}, nil, "BCRYPT_COST: ", []string{"10 to 15"}},
		{"cost too high", env{"BCRYPT_COST": "16"}, nil, "BCRYPT_COST: ", []string{"10 to 15"}},
		{"cost flag over a good variable", env{"BCRYPT_COST": "12"}, []string{"-bcrypt-cost=4"}, "-bcrypt-cost: ", []string{"10 to 15"}},
		{"pool size", env{"DB_MAX_CONNS": "0"}, nil, "DB_MAX_CONNS: ", nil},
		{"pooler mode", env{"DB_POOLER": "session"}, nil, `DB_POOLER: must be "none" or "transaction", got "session"`, nil},
		{"pooler flag", nil, []string{"-db-pooler", "Transaction"}, "-db-pooler: ", []string{`"Transaction"`}},
		{"token with spaces", env{"API_TOKEN": "tok "}, nil, "API_TOKEN: ", []string{"white space"}},
		{"stream limit", env{"MAX_STREAMS": "x"}, nil, "MAX_STREAMS: ", []string{`"x"`}},
		{"client limit", env{"MAX_CLIENTS": "0"}, nil, "MAX_CLIENTS: ", nil},
		{"client limit flag", nil, []string{"-max-clients", "many"}, "-max-clients: ", []string{`"many"`}},
		{"trusted proxies", env{"TRUSTED_PROXIES": "10.0.0.0/8 192.0.2.1"}, nil, "TRUSTED_PROXIES: ", []string{"CIDRs"}},
		{"log format", env{"LOG_FORMAT": "logfmt"}, nil, `LOG_FORMAT: must be "text" or "json", got "logfmt"`, nil},
		{"GOMAXPROCS not a number", env{"GOMAXPROCS": "abc"}, nil, "GOMAXPROCS: ", []string{`"abc"`}},
		{"stray argument", nil, []string{"serve"}, "unexpected arguments", nil},
		{"unknown flag", nil, []string{"-nope"}, "", []string{"-nope"}},
		{"port not a number", env{"PORT": "http"}, nil, "PORT: ", []string{`"http"`}},
		{"port out of range", env{"PORT": "65536"}, nil, "PORT: ", nil},
		{"address variable", env{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:-1"}, nil, "ADDR: ", nil},
		{"address flag", env{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0"}, []string{"-addr", "127.0.0.1:-1"}, "-addr: ", nil},
		{"database flag", env{"DATABASE_URL": databaseURL}, []string{"-database-url", downURL}, "-database-url: " + cannotUse, nil},
		{"database URL in quotes", env{"DATABASE_URL": `"` + downURL + `"`}, nil, "DATABASE_URL: " + cannotUse, nil},
		{"database settings with a stray word", env{"DATABASE_URL": "host=127.0.0.1 user=ann password=hunter2 hunter3 dbname=db"}, nil,
			"DATABASE_URL: lib/pq cannot read it", nil},
		{"database name with settings", env{"DATABASE_URL": "dbname='host=127.0.0.1 password=hunter2'"}, nil,
			"DATABASE_URL: the database name holds connection settings", nil},
		{"database hosts", env{"DATABASE_URL": "postgres://ann:hunter2@" + down + "," + other + "/db?sslmode=disable"}, nil,
			"DATABASE_URL: cannot use the database [host=" + downHost + "," + downHost + " port=" + downPort + "," + otherPort + " name=db]: ", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr syncBuffer
			err := run(context.Background(), tt.args, func(k string) string { return tt.env[k] }, &stdout)
			if err == nil {
				t.Fatalf("run(%q, %v) succeeded, want an error", tt.args, tt.env)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, tt.want) || strings.Contains(msg, "\n") {
				t.Errorf("run(%q, %v) = %q, want one line starting %q", tt.args, tt.env, msg, tt.want)
			}
			for _, want := range tt.wants {
				if !strings.Contains(msg, want) {
					t.Errorf("run(%q, %v) = %q, want it to mention %q", tt.args, tt.env, msg, want)
				}
			}
			if out := msg + stdout.String() + stderr.String(); strings.Contains(out, "hunter") || stderr.String() != "" {
				t.Errorf("run(%q, ...) wrote %q to stderr, or showed the password: %s", tt.args, stderr.String(), out)
			}
		})
	}
}

func TestLoadConfig(t *testing.T) {
	t.Parallel()
	defaults := config{addr: "127.0.0.1:8000", databaseURL: defaultDatabaseURL, bcryptCost: defaultBcryptCost, maxStreams: defaultMaxStreams,
		pool: poolConfig{maxOpen: 16, maxIdle: 16, maxIdleTime: 5 * time.Minute}}
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	defaults.maxClients = int(min(lim.Cur/2, 4096))
	with := func(change func(*config)) config {
		c := defaults
		change(&c)
		return c
	}
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want config
	}{
		{"defaults", nil, nil, defaults},
		{"platform PORT", map[string]string{"PORT": "9000"}, nil, with(func(c *config) { c.addr = ":9000" })},
		{"ADDR wins over PORT", map[string]string{"PORT": "9000", "ADDR": "0.0.0.0:80"}, nil, with(func(c *config) { c.addr = "0.0.0.0:80" })},
		{"environment", map[string]string{
			"DATABASE_URL": "postgres://db/x", "BCRYPT_COST": "10", "API_TOKEN": "t", "DB_MAX_CONNS": "8",
			"DB_POOLER": "transaction", "MAX_STREAMS": "5", "MAX_CLIENTS": "100", "TRUSTED_PROXIES": "10.0.0.0/8, ::1", "LOG_FORMAT": "json",
		}, nil, with(func(c *config) {
			c.databaseURL, c.bcryptCost, c.apiToken, c.maxStreams, c.maxClients, c.jsonLogs = "postgres://db/x", 10, "t", 5, 100, true
			c.proxies = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::1/128")}
			c.pool.maxOpen, c.pool.maxIdle, c.pool.transactionPooler = 8, 8, true
		})},
		{"flags win over the environment", map[string]string{
			"ADDR": ":1", "DATABASE_URL": "postgres://a/", "BCRYPT_COST": "10", "DB_POOLER": "transaction", "MAX_STREAMS": "5", "MAX_CLIENTS": "100",
			"LOG_FORMAT": "json",
		}, []string{
			"-addr", ":2", "-database-url", "postgres://b/", "-bcrypt-cost", "15", "-db-pooler", "none", "-max-streams", "6", "-max-clients", "200",
			"-log-format", "text",
		}, with(func(c *config) {
			c.addr, c.databaseURL, c.bcryptCost, c.maxStreams, c.maxClients = ":2", "postgres://b/", 15, 6, 200
		})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := loadConfig(tt.args, func(k string) string { return tt.env[k] }, io.Discard)
			if err != nil {
				t.Fatalf("loadConfig(%q, %v) = %v", tt.args, tt.env, err)
			}
			// Where a value came from shows in errors: see
			// TestRunRefusesBadConfiguration.
			got.addrFrom, got.databaseURLFrom = "", ""
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("loadConfig(%q, %v) = %+v, want %+v", tt.args, tt.env, got, tt.want)
			}
		})
	}
}

// TestParseDatabaseURL checks what lib/pq reads from DATABASE_URL as
// parseDatabaseURL hands it over.
func TestParseDatabaseURL(t *testing.T) {
	t.Parallel()
	accepted := []struct{ name, value, want string }{
		{"URL", "postgres://ann:se%20cret@db.example.com:6432/users?sslmode=require", `[host=db.example.com port=6432 name=users] "se cret"`},
		{"postgresql scheme, upper case", "POSTGRESQL://db/users", `[host=db port=5432 name=users] ""`},
		{"in double quotes, with spaces", ` "postgres://db/users" `, `[host=db port=5432 name=users] ""`},
		{"in single quotes", `'postgres://db/users'`, `[host=db port=5432 name=users] ""`},
		{"hosts with ports", "postgres://ann:p%40ss@h1:5432,h2:5433/db?target_session_attrs=read-write&sslmode=disable",
			`[host=h1,h2 port=5432,5433 name=db] "p@ss" read-write`},
		{"hosts, ports as a parameter", "postgres://h1,h2/db?port=5432,5433", `[host=h1,h2 port=5432,5433 name=db] ""`},
		{"a host without its port", "postgres://h1,h2:5433/db", `[host=h1,h2 port=5432,5433 name=db] ""`},
		{"IPv6 hosts", "postgres://[::1]:5432,[2001:db8::1]/db", `[host=::1,2001:db8::1 port=5432,5432 name=db] ""`},
		{"socket directory", "postgres://%2Fvar%2Frun%2Fpostgresql/db", `[host=/var/run/postgresql port=5432 name=db] ""`},
		{"host as a parameter", "postgres:///db?host=/tmp", `[host=/tmp port=5432 name=db] ""`},
		{"key=value", "host=h1,h2 port=5432,5433 dbname=db target_session_attrs=read-write", `[host=h1,h2 port=5432,5433 name=db] "" read-write`},
		{"key=value, quoted and escaped", `user = ann password='it\'s a secret' dbname=a\ b`, `[host=localhost port=5432 name=a b] "it's a secret"`},
	}
	for _, tt := range accepted {
		got, err := parseDatabaseURL(tt.value)
		cfg, _ := pq.NewConfig(got)
		if read := strings.TrimSpace(fmt.Sprintf("%s %q %s", databaseAttr(got).Value, cfg.Password, cfg.TargetSessionAttrs)); err != nil || read != tt.want {
			t.Errorf("%s: parseDatabaseURL(%q) = %q, %v; lib/pq reads %q, want %q", tt.name, tt.value, got, err, read, tt.want)
		}
	}

	// Each holds the password hunter2 and the host secret-host: an error
	// may show neither.
	for _, value := range []string{
		"postgresql+asyncpg://ann:hunter2@secret-host/db",
		"postgress://ann:hunter2@secret-host/db",
		"ann:hunter2@secret-host/db",
		"postgres://ann:hunter2@secret-host:port/db",
		"postgres://ann:hunter2@secret-host:65536/db",
		"postgres://ann:12/hunter2@secret-host/db",
		"postgres://ann:12#hunter2@secret-host/db",
		"postgres://ann:hunter%2@secret-host/db",
		`"postgres://ann:hunter2@secret-host/db`,
		"postgres://ann:hunter2@secret-host/db?sslmode=sometimes",
		"host=secret-host user=ann password=hunter2 hunter3",
		"host=secret-host password=hunter2 and more",
		"host=secret-host password='hunter2",
		// libpq reads a database name with an '=' or a scheme as more
		// settings; lib/pq would send it to the server, and print it.
		"dbname='host=secret-host password=hunter2'",
		"postgres://ann@h/host=secret-host%20password=hunter2",
		"postgres://ann@h/db?dbname=host%3Dsecret-host%20password%3Dhunter2",
		"dbname=postgres://ann:hunter2@secret-host/db",
	} {
		_, err := parseDatabaseURL(value)
		if err == nil || strings.Contains(err.Error(), "\n") || strings.Contains(err.Error(), "hunter") || strings.Contains(err.Error(), "secret") {
			t.Errorf("parseDatabaseURL(%q) = %v, want an error of one line that shows nothing of the value", value, err)
		}
	}
	several := "host=h1,h2 port=5432,5433 dbname=db password=hunter2"
	if got, want := databaseAttr(several).String(), "database=[host=h1,h2 port=5432,5433 name=db]"; got != want {
		t.Errorf("databaseAttr(%q) = %s, want %s: every host, no password", several, got, want)
	}
}

// TestHelpAndVersion checks that -h prints what the program is and every
// setting, by its variable, flag and default, and -version one line, both
// whatever the environment holds.
func TestHelpAndVersion(t *testing.T) {
	t.Parallel()
	help := []string{"users serves a user-management REST API backed by PostgreSQL.\n", "-version\n"}
	for _, st := range new(config).settings() {
		help = append(help, "  "+st.env, st.usage)
		if st.flag != "" {
			help = append(help, ", -"+st.flag+"\n")
		}
		if st.def != "" {
			help = append(help, "default: "+st.def+"\n")
		}
	}
	version := regexp.MustCompile(`^users \S+\n$`)
	env := map[string]string{"BCRYPT_COST": "3", "PORT": "x"}
	for _, arg := range []string{"-h", "-help", "--help", "-version"} {
		var stdout, stderr syncBuffer
		err := run(context.Background(), []string{arg}, func(k string) string { return env[k] }, &stdout)
		if err != nil || stderr.String() != "" {
			t.Errorf("run %s = %v, stderr %q; want nil and nothing on stderr", arg, err, stderr.String())
		}
		out := stdout.String()
		if arg == "-version" {
			if !version.MatchString(out) {
				t.Errorf("run -version: %q, want one line \"users <version>\"", out)
			}
			continue
		}
		if !strings.HasPrefix(out, help[0]) {
			t.Errorf("run %s: %q, want it to start with what the program is", arg, out)
		}
		for _, want := range help {
			if !strings.Contains(out, want) {
				t.Errorf("run %s: help does not have %q:\n%s", arg, want, out)
			}
		}
	}
}

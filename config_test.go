package main

import (
	"context"
	"fmt"
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
// with one line that names the setting as it was given (the flag if it came
// from a flag) and shows no password: each value that holds one holds hunter2.
func TestRunRefusesBadConfiguration(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	down, other := closedAddr(t), closedAddr(t) // on 127.0.0.1
	downURL := "postgres://ann:hunter2@" + down + "/db?sslmode=disable"
	cannotUse := `cannot use the database \[host=127\.0\.0\.1 port=\d+ name=db\]: `
	type env = map[string]string
	tests := []struct {
		name string
		env  env
		args []string
		want string // a regular expression the error matches
	}{
		{"cost not a number", env{"BCRYPT_COST": "twelve"}, nil, `^BCRYPT_COST: .*"twelve"`},
		{"cost out of range", env{"BCRYPT_COST": "16"}, nil, `^BCRYPT_COST: .*10 to 15`},
		{"cost flag over a good variable", env{"BCRYPT_COST": "12"}, []string{"-bcrypt-cost=4"}, `^-bcrypt-cost: .*10 to 15`},
		{"pool size", env{"DB_MAX_CONNS": "0"}, nil, `^DB_MAX_CONNS: `},
		{"pooler mode", env{"DB_POOLER": "session"}, nil, `^DB_POOLER: must be "none" or "transaction", got "session"$`},
		{"pooler flag", nil, []string{"-db-pooler", "Transaction"}, `^-db-pooler: .*"Transaction"`},
		{"token with spaces", env{"API_TOKEN": "tok "}, nil, `^API_TOKEN: .*white space`},
		{"stream limit", env{"MAX_STREAMS": "x"}, nil, `^MAX_STREAMS: .*"x"`},
		{"client limit flag", nil, []string{"-max-clients", "many"}, `^-max-clients: .*"many"`},
		{"trusted proxies", env{"TRUSTED_PROXIES": "10.0.0.0/8 192.0.2.1"}, nil, `^TRUSTED_PROXIES: .*CIDRs`},
		{"log format", env{"LOG_FORMAT": "logfmt"}, nil, `^LOG_FORMAT: must be "text" or "json", got "logfmt"$`},
		{"GOMAXPROCS not a number", env{"GOMAXPROCS": "abc"}, nil, `^GOMAXPROCS: .*"abc"`},
		{"stray argument", nil, []string{"serve"}, `^unexpected arguments`},
		{"unknown flag", nil, []string{"-nope"}, `-nope`},
		{"port not a number", env{"PORT": "http"}, nil, `^PORT: .*"http"`},
		{"port out of range", env{"PORT": "65536"}, nil, `^PORT: `},
		{"address variable", env{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:-1"}, nil, `^ADDR: `},
		{"address flag", env{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0"}, []string{"-addr", "127.0.0.1:-1"}, `^-addr: `},
		{"database flag", env{"DATABASE_URL": databaseURL}, []string{"-database-url", downURL}, `^-database-url: ` + cannotUse},
		{"database URL in quotes", env{"DATABASE_URL": `"` + downURL + `"`}, nil, `^DATABASE_URL: ` + cannotUse},
		{"database settings with a stray word", env{"DATABASE_URL": "host=127.0.0.1 user=ann password=hunter2 hunter3 dbname=db"}, nil,
			`^DATABASE_URL: lib/pq cannot read it`},
		{"database name with settings", env{"DATABASE_URL": "dbname='host=127.0.0.1 password=hunter2'"}, nil,
			`^DATABASE_URL: the database name holds connection settings`},
		{"database hosts", env{"DATABASE_URL": "postgres://ann:hunter2@" + down + "," + other + "/db?sslmode=disable"}, nil,
			`^DATABASE_URL: cannot use the database \[host=127\.0\.0\.1,127\.0\.0\.1 port=\d+,\d+ name=db\]: `},
	}
	for _, tt := range tests {
		var logs syncBuffer
		err := run(context.Background(), tt.args, func(k string) string { return tt.env[k] }, &logs)
		msg := fmt.Sprint(err)
		if err == nil || !regexp.MustCompile(tt.want).MatchString(msg) || strings.Contains(msg, "\n") || strings.Contains(msg+logs.String(), "hunter") {
			t.Errorf("%s: run(%q, %v) = %v, want one line matching %s, and no password in it or the log:\n%s", tt.name, tt.args, tt.env, err, tt.want, logs.String())
		}
	}
}

func TestLoadConfig(t *testing.T) {
	t.Parallel()
	with := func(c config, change func(*config)) config {
		change(&c)
		return c
	}
	defaults := config{addr: "127.0.0.1:8000", databaseURL: defaultDatabaseURL, bcryptCost: defaultBcryptCost, maxStreams: defaultMaxStreams,
		pool: poolConfig{maxOpen: 16, maxIdle: 16, maxIdleTime: 5 * time.Minute}}
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	defaults.maxClients = int(min(lim.Cur/2, 4096)) // MAX_CLIENTS=auto
	env := map[string]string{"DATABASE_URL": "postgres://db/x", "BCRYPT_COST": "10", "API_TOKEN": "t", "DB_MAX_CONNS": "8", "DB_POOLER": "transaction",
		"MAX_STREAMS": "5", "MAX_CLIENTS": "100", "TRUSTED_PROXIES": "10.0.0.0/8, ::1", "LOG_FORMAT": "json", "ADDR": ":1"}
	fromEnv := with(defaults, func(c *config) {
		c.addr, c.databaseURL, c.bcryptCost, c.apiToken, c.maxStreams, c.maxClients, c.jsonLogs = ":1", "postgres://db/x", 10, "t", 5, 100, true
		c.proxies = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::1/128")}
		c.pool.maxOpen, c.pool.maxIdle, c.pool.transactionPooler = 8, 8, true
	})
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want config
	}{
		{"defaults", nil, nil, defaults},
		{"platform PORT", map[string]string{"PORT": "9000"}, nil, with(defaults, func(c *config) { c.addr = ":9000" })},
		{"ADDR wins over PORT", map[string]string{"PORT": "9000", "ADDR": "0.0.0.0:80"}, nil, with(defaults, func(c *config) { c.addr = "0.0.0.0:80" })},
		{"environment", env, nil, fromEnv},
		{"flags win over the environment", env, []string{"-addr", ":2", "-database-url", "postgres://b/", "-bcrypt-cost", "15", "-db-pooler", "none",
			"-max-streams", "6", "-max-clients", "200", "-log-format", "text"}, with(fromEnv, func(c *config) {
			c.addr, c.databaseURL, c.bcryptCost, c.maxStreams, c.maxClients, c.jsonLogs, c.pool.transactionPooler = ":2", "postgres://b/", 15, 6, 200, false, false
		})},
	}
	for _, tt := range tests {
		got, err := loadConfig(tt.args, func(k string) string { return tt.env[k] }, nil)
		got.addrFrom, got.databaseURLFrom = "", "" // see TestRunRefusesBadConfiguration
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: loadConfig(%q, %v) = %+v, %v; want %+v", tt.name, tt.args, tt.env, got, err, tt.want)
		}
	}
}

// TestParseDatabaseURL checks what lib/pq reads from DATABASE_URL as
// parseDatabaseURL hands it over, and that its errors show nothing of it.
func TestParseDatabaseURL(t *testing.T) {
	t.Parallel()
	accepted := []struct{ value, want string }{
		{"postgres://ann:se%20cret@db.example.com:6432/users?sslmode=require", `[host=db.example.com port=6432 name=users] "se cret"`},
		{"POSTGRESQL://db/users", `[host=db port=5432 name=users] ""`},
		{` "postgres://db/users" `, `[host=db port=5432 name=users] ""`},
		{`'postgres://db/users'`, `[host=db port=5432 name=users] ""`},
		{"postgres://ann:p%40ss@h1:5432,h2:5433/db?target_session_attrs=read-write&sslmode=disable", `[host=h1,h2 port=5432,5433 name=db] "p@ss" read-write`},
		{"postgres://h1,h2/db?port=5432,5433", `[host=h1,h2 port=5432,5433 name=db] ""`},
		{"postgres://h1,h2:5433/db", `[host=h1,h2 port=5432,5433 name=db] ""`},
		{"postgres://[::1]:5432,[2001:db8::1]/db", `[host=::1,2001:db8::1 port=5432,5432 name=db] ""`},
		{"postgres://%2Fvar%2Frun%2Fpostgresql/db", `[host=/var/run/postgresql port=5432 name=db] ""`},
		{"postgres:///db?host=/tmp", `[host=/tmp port=5432 name=db] ""`},
		{"host=h1,h2 port=5432,5433 dbname=db target_session_attrs=read-write", `[host=h1,h2 port=5432,5433 name=db] "" read-write`},
		{`user = ann password='it\'s a secret' dbname=a\ b`, `[host=localhost port=5432 name=a b] "it's a secret"`},
	}
	for _, tt := range accepted {
		got, err := parseDatabaseURL(tt.value)
		cfg, _ := pq.NewConfig(got)
		if read := strings.TrimSpace(fmt.Sprintf("%s %q %s", databaseAttr(got).Value, cfg.Password, cfg.TargetSessionAttrs)); err != nil || read != tt.want {
			t.Errorf("parseDatabaseURL(%q) = %q, %v; lib/pq reads %q, want %q", tt.value, got, err, read, tt.want)
		}
	}
	// Each holds the password hunter2 and the host secret-host.
	for _, value := range []string{
		"postgresql+asyncpg://ann:hunter2@secret-host/db",
		"postgres://ann:hunter2@secret-host:port/db",
		"postgres://ann:12/hunter2@secret-host/db",
		"postgres://ann:hunter%2@secret-host/db",
		"postgres://ann:hunter2@secret-host/db?sslmode=sometimes",
		"host=secret-host user=ann password=hunter2 hunter3",
		// libpq reads a database name with an '=' or a scheme as settings.
		"dbname='host=secret-host password=hunter2'",
		"postgres://ann@h/host=secret-host%20password=hunter2",
		"postgres://ann@h/db?dbname=host%3Dsecret-host%20password%3Dhunter2",
		"dbname=postgres://ann:hunter2@secret-host/db",
	} {
		_, err := parseDatabaseURL(value)
		if msg := fmt.Sprint(err); err == nil || strings.Contains(msg, "\n") || strings.Contains(msg, "hunter") || strings.Contains(msg, "secret") {
			t.Errorf("parseDatabaseURL(%q) = %v, want an error of one line that shows nothing of the value", value, err)
		}
	}
}

// TestHelpAndVersion checks that -h prints every setting, by its variable,
// flag and default, and -version one line, whatever the environment holds.
func TestHelpAndVersion(t *testing.T) {
	t.Parallel()
	help := []string{"users serves a user-management REST API backed by PostgreSQL.\n", "-version\n"}
	for _, st := range new(config).settings() {
		help = append(help, "  "+st.env, "-"+st.flag, st.usage+"\n", "default: "+st.def)
	}
	getenv := func(k string) string { return map[string]string{"BCRYPT_COST": "3", "PORT": "x"}[k] }
	var out, version syncBuffer
	if err := run(context.Background(), []string{"-h"}, getenv, &out); err != nil || !strings.HasPrefix(out.String(), help[0]) {
		t.Errorf("run -h = %v, %q; want nil and the help", err, out.String())
	}
	for _, want := range help {
		if !strings.Contains(out.String(), want) {
			t.Errorf("run -h: the help does not have %q:\n%s", want, out.String())
		}
	}
	if err := run(context.Background(), []string{"-version"}, getenv, &version); err != nil || !regexp.MustCompile(`^users \S+\n$`).MatchString(version.String()) {
		t.Errorf("run -version = %v, %q; want nil and one line \"users <version>\"", err, version.String())
	}
}

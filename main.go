// Command users serves a user-management REST API backed by PostgreSQL.
//
// It reads its configuration from the environment and flags (see README.md),
// applies the embedded schema.sql on boot, and stops gracefully on SIGINT or
// SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"
	"time"

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
	// hash wait, a hash and a query (the list stream extends it batch by
	// batch); IdleTimeout frees idle keep-alive connections.
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 16 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 60 * time.Second
	maxHeaderBytes    = 64 << 10
)

func main() {
	// One P more than the runtime would take: run gives bcrypt every P but
	// one, so on this machine every core can hash and a flood of creates
	// still leaves a P to serve reads (see run).
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	if err != nil {
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
}

// loadConfig reads the configuration: a flag wins over its environment
// variable, which wins over the default. Errors name the variable.
func loadConfig(args []string, getenv func(string) string, stderr io.Writer) (config, error) {
	cfg := config{
		addr:        defaultAddr,
		databaseURL: defaultDatabaseURL,
		bcryptCost:  defaultBcryptCost,
		apiToken:    getenv("API_TOKEN"),
		pool:        poolConfig{maxOpen: 16, maxIdle: 16, maxIdleTime: 5 * time.Minute},
	}
	if port := getenv("PORT"); port != "" {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return cfg, fmt.Errorf("PORT: must be a port number from 1 to 65535, got %q", port)
		}
		cfg.addr = ":" + port
	}
	if addr := getenv("ADDR"); addr != "" {
		cfg.addr = addr
	}
	if u := getenv("DATABASE_URL"); u != "" {
		cfg.databaseURL = u
	}
	if s := getenv("BCRYPT_COST"); s != "" {
		cost, err := parseBcryptCost(s)
		if err != nil {
			return cfg, fmt.Errorf("BCRYPT_COST: %w", err)
		}
		cfg.bcryptCost = cost
	}
	if s := getenv("DB_MAX_CONNS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return cfg, fmt.Errorf("DB_MAX_CONNS: must be a positive integer, got %q", s)
		}
		cfg.pool.maxOpen, cfg.pool.maxIdle = n, n
	}

	fs := flag.NewFlagSet("users", flag.ContinueOnError)
	// Errors come back as one line; the usage is printed only for -h.
	fs.SetOutput(io.Discard)
	fs.StringVar(&cfg.addr, "addr", cfg.addr, "listen `address` (env ADDR, or :$PORT)")
	// The URL's default is not shown in -h, since it may hold a password.
	fs.Func("database-url", "PostgreSQL connection `URL` (env DATABASE_URL)", func(s string) error {
		cfg.databaseURL = s
		return nil
	})
	cost := fs.String("bcrypt-cost", strconv.Itoa(cfg.bcryptCost), "bcrypt `cost`, 10 to 15 (env BCRYPT_COST)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stderr)
			fs.Usage()
		}
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	var err error
	if cfg.bcryptCost, err = parseBcryptCost(*cost); err != nil {
		return cfg, fmt.Errorf("-bcrypt-cost: %w", err)
	}
	return cfg, nil
}

func parseBcryptCost(s string) (int, error) {
	cost, err := strconv.Atoi(s)
	if err != nil || cost < 10 || cost > 15 {
		return 0, fmt.Errorf("must be an integer from 10 to 15, got %q", s)
	}
	return cost, nil
}

// run starts the service and blocks until ctx is cancelled, then shuts it
// down gracefully. It returns an error if the service cannot start.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cfg, err := loadConfig(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(stdout, nil))

	startCtx, cancel := context.WithTimeout(ctx, connectTimeout)
	st, err := openStore(startCtx, cfg.databaseURL, cfg.pool, queryTimeout)
	cancel()
	if err != nil {
		return fmt.Errorf("DATABASE_URL: cannot use the database at %s: %w", databaseAddr(cfg.databaseURL), redactURLError(err))
	}
	defer st.Close()

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return fmt.Errorf("ADDR: %w", err)
	}
	if cfg.apiToken == "" && !isLoopback(ln.Addr()) {
		logger.Warn("API_TOKEN is not set: anyone who can reach this address can read and change users", "addr", ln.Addr().String())
	}

	// Hashes may run on every P but one. A hash holds its P for a long
	// time, and the Go scheduler takes it back only every 10 ms: were every
	// P hashing, each step of a read would wait that long for one.
	hashSlots := max(1, runtime.GOMAXPROCS(0)-1)
	h := newHasher(cfg.bcryptCost, hashSlots, hashWait)
	srv := newHTTPServer(newServer(logger, st, h, cfg.apiToken), logger)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	logger.Info("listening", "addr", ln.Addr().String(), "bcrypt_cost", cfg.bcryptCost)

	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}
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
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
}

// databaseAddr returns the host and port that databaseURL names, for error
// messages: never the whole URL, which may hold a password.
func databaseAddr(databaseURL string) string {
	cfg, err := pq.NewConfig(databaseURL)
	if err != nil {
		return "(unparsable DATABASE_URL)"
	}
	return net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
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

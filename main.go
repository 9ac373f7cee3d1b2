// Command users serves a user-management REST API backed by PostgreSQL.
// Settings come from the environment and flags (see README.md); it applies
// the embedded schema.sql at start and stops gracefully on SIGINT or SIGTERM.
package main

import (
	"bufio"
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The service's bounds, as the README's Timeouts list them.
const (
	connectTimeout    = 5 * time.Second  // connecting and applying the schema at start
	queryTimeout      = 5 * time.Second  // the database time of each store call
	hashWait          = 10 * time.Second // waiting for a hashing slot, then 503
	shutdownTimeout   = 20 * time.Second // in-flight requests after a signal
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 16 * time.Second // a whole request: 1 MiB at 64 KiB/s
	writeTimeout      = 30 * time.Second // a hash wait, a hash and a query; a list moves it on as it sends
	idleTimeout       = 60 * time.Second
	maxHeaderBytes    = 64 << 10
	streamStall       = 10 * time.Second // a list whose client takes nothing this long is cut
)

func main() {
	if err := run(context.Background(), os.Args[1:], os.Getenv, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "users:", err)
		os.Exit(1)
	}
}

// run serves until ctx is cancelled or the process gets SIGINT or SIGTERM,
// then shuts down gracefully. It returns an error if the service cannot start.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := loadConfig(args, getenv, stdout)
	if errors.Is(err, errPrinted) {
		return nil
	}
	if err != nil {
		return err
	}
	logs := &logWriter{Writer: bufio.NewWriterSize(stdout, 32<<10)}
	defer logs.flush()
	var handler slog.Handler = slog.NewTextHandler(logs, nil)
	if cfg.jsonLogs {
		handler = slog.NewJSONHandler(logs, nil)
	}
	logger := slog.New(handler)

	startCtx, cancel := context.WithTimeout(ctx, connectTimeout)
	st, err := openStore(startCtx, cfg.databaseURL, cfg.pool, queryTimeout)
	cancel()
	if err != nil {
		// lib/pq puts each host's error on a line of its own.
		cause := strings.NewReplacer(":\n", ": ", "\n", "; ").Replace(err.Error())
		return fmt.Errorf("%s: cannot use the database %s: %s", cfg.databaseURLFrom, databaseAttr(cfg.databaseURL).Value, cause)
	}
	defer st.Close()

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return fmt.Errorf("%s: %w", cfg.addrFrom, err)
	}
	loopback := ln.Addr().(*net.TCPAddr).IP.IsLoopback()
	if cfg.apiToken == "" && !loopback {
		logger.Warn("API_TOKEN is not set: anyone who can reach this address can read and change users", "addr", ln.Addr().String())
	}
	// A hash holds its P until the scheduler preempts it (10 ms): one P is
	// left free so that reads do not wait for that.
	h := newHasher(cfg.bcryptCost, max(1, runtime.GOMAXPROCS(0)-1), hashWait)
	opts := serverOptions{maxStreams: cfg.maxStreams, streamStall: streamStall, trustedProxies: cfg.proxies}
	// Without a token, loopback is the only guard: refuse other Hosts (DNS rebinding).
	opts.loopbackHostsOnly = cfg.apiToken == "" && loopback
	srv := newHTTPServer(newServer(logger, st, h, cfg.apiToken, opts), logger)
	clients := limitClients(srv, ln, cfg.maxClients, logger)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(clients) }()
	logger.Info("listening", "addr", ln.Addr().String(), databaseAttr(cfg.databaseURL), "bcrypt_cost", cfg.bcryptCost,
		"max_clients", cfg.maxClients, "max_streams", cfg.maxStreams)

	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}
	stop() // a second signal stops the process at once
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

// logWriter holds log lines for up to 100 ms, then writes them at once: a
// write(2) a line cost reads a tenth of their rate.
type logWriter struct {
	sync.Mutex
	*bufio.Writer
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.Lock()
	defer w.Unlock()
	if w.Buffered() == 0 {
		time.AfterFunc(100*time.Millisecond, w.flush)
	}
	return w.Writer.Write(p)
}

func (w *logWriter) flush() {
	w.Lock()
	defer w.Unlock()
	w.Flush()
}

// newHTTPServer returns the server for handler, with the service's timeouts and limits.
func newHTTPServer(handler http.Handler, logger *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		// "OPTIONS *" goes to the handler, which answers it in JSON.
		DisableGeneralOptionsHandler: true,
		ErrorLog:                     slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		ConnContext:                  func(ctx context.Context, c net.Conn) context.Context { limitUnsent(c); return ctx },
	}
}

// limitUnsent caps what c's socket holds unsent, on Linux, so that a writer
// blocked on a full send buffer wakes as a slow client reads, not once
// megabytes have drained: a slow reader must not look stalled.
func limitUnsent(c net.Conn) {
	const tcpNotSentLowat, maxUnsent = 0x19, 128 << 10
	if sc, ok := c.(syscall.Conn); ok && runtime.GOOS == "linux" {
		if raw, err := sc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpNotSentLowat, maxUnsent) })
		}
	}
}

// clientLimiter is a listener that holds at most max client connections. One
// more closes the connection idle longest (between requests, or before its
// first whole request); if every one is busy, the new one gets 503.
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

// limitClients makes srv hold at most max connections from ln, and returns the listener srv must serve.
func limitClients(srv *http.Server, ln net.Listener, max int, logger *slog.Logger) net.Listener {
	l := &clientLimiter{Listener: ln, max: max, logger: logger,
		conns: make(map[net.Conn]*list.Element), idle: list.New(), refusing: make(chan struct{}, 32)}
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

// admit makes room for c, closing the connection idle longest if need be, and reports whether it could.
func (l *clientLimiter) admit(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.conns) >= l.max {
		oldest := l.idle.Front()
		if oldest == nil {
			return false
		}
		evicted := l.idle.Remove(oldest).(net.Conn)
		delete(l.conns, evicted)
		evicted.Close()
	}
	// Until it has sent a whole request, a connection counts as idle.
	l.conns[c] = l.idle.PushBack(c)
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
const busyAnswer = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n" +
	"Connection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n" +
	"Content-Length: 33\r\n\r\n" + `{"detail":"Service unavailable"}` + "\n"

// refuse answers c 503 and closes it. Closing with unread data resets the
// connection, which may lose the answer: so what the client sends is read
// and dropped first, for up to a second while few refusals are under way.
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

package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/netip"
	"net/url"
	"path"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"
)

// This file is the HTTP surface, in five parts: the routes and the handler
// constructor; the middleware every request passes through; the handlers;
// reading and validating input; and writing answers.

// Limits on what clients send, and on what the service sends back.
const (
	maxBodyBytes     = 1 << 20 // a request body
	maxNameChars     = 128     // first_name and last_name, in characters
	maxEmailBytes    = 254     // an address, per RFC 5321's path limit
	minPasswordChars = 8       // NIST SP 800-63B's floor
	maxPasswordBytes = 72      // bcrypt reads no further
	maxPageSize      = 1000    // ?limit=

	// An error body echoes names the client chose (unknown fields and
	// query parameters): it lists at most maxErrorEntries of them, each cut
	// to maxErrorName bytes, and stays within maxErrorBytes in all.
	maxErrorEntries = 20
	maxErrorName    = 64
	maxErrorBytes   = 4 << 10

	// maxLogField is how much of a method or a path the access log keeps.
	maxLogField = 200
)

// A whole-table list is streamed in batches of listBatchSize users, one
// query each, so that no database connection is held while a client reads.
// A batch goes out listChunk bytes at a time, each with the streamStall
// option to be taken: a client that keeps reading may take as long as the
// list needs, one that stalls is cut off.
const (
	listBatchSize = 1000
	listChunk     = 16 << 10
)

// retryAfter is the Retry-After of every 503, in seconds: hashing slots free
// up within a second, and a client that retries each second through a
// database failover is back as soon as the new primary is.
const retryAfter = "1"

// Routes and the handler constructor.

// server holds what the handlers need.
type server struct {
	logger   *slog.Logger
	store    *store
	hasher   *hasher
	apiToken string
	serverOptions
	streams chan struct{} // a slot for each whole-table list stream
	batches sync.Pool     // *bytes.Buffer: a list stream's batch, kept for the next
}

// serverOptions are newServer's settings besides the API token.
type serverOptions struct {
	// maxStreams bounds the whole-table list streams served at once.
	maxStreams int
	// streamStall is how long a list stream waits for its client to take
	// the next chunk before it cuts the connection.
	streamStall time.Duration
	// loopbackHostsOnly makes the service answer only requests whose Host
	// names a loopback host. Set when the service listens on loopback
	// without a token, it keeps web pages out by DNS rebinding.
	loopbackHostsOnly bool
}

// route is one entry of the API surface.
type route struct {
	method, pattern string
	handler         http.HandlerFunc
	public          bool // served without the API token
}

// routes is the whole API surface. Both /users and /users/ are served
// explicitly: a subtree pattern would answer /users with a redirect, which
// clients follow for a POST by re-sending it as a GET without its body.
func (s *server) routes() []route {
	return []route{
		{"GET", "/healthz", s.health, true},
		{"GET", "/openapi.json", serveOpenAPI, true},
		{"GET", "/docs", serveDocs, true},
		{"POST", "/users", s.createUser, false},
		{"POST", "/users/{$}", s.createUser, false},
		{"GET", "/users", s.listUsers, false},
		{"GET", "/users/{$}", s.listUsers, false},
		{"GET", "/users/{id}", s.getUser, false},
		{"PUT", "/users/{id}", s.updateUser, false},
		{"DELETE", "/users/{id}", s.deleteUser, false},
		{"POST", "/users/authenticate", s.authenticate, false},
	}
}

// newServer returns the service's HTTP handler. If apiToken is not empty,
// every route but the public ones requires it as a bearer token. Every POST
// and PUT body must be labelled JSON.
func newServer(logger *slog.Logger, st *store, h *hasher, apiToken string, opts serverOptions) http.Handler {
	s := &server{logger: logger, store: st, hasher: h, apiToken: apiToken, serverOptions: opts,
		streams: make(chan struct{}, opts.maxStreams)}
	s.batches.New = func() any { return new(bytes.Buffer) }
	mux := http.NewServeMux()
	for _, rt := range s.routes() {
		var h http.Handler = rt.handler
		if rt.method == http.MethodPost || rt.method == http.MethodPut {
			h = requireJSON(h)
		}
		if !rt.public && apiToken != "" {
			h = s.requireToken(h)
		}
		mux.Handle(rt.method+" "+rt.pattern, h)
	}
	return s.wrap(mux)
}

// Middleware.

// wrap adds what every response gets: security headers, JSON bodies for the
// mux's own 404 and 405 answers, recovery from panics, and an access log line.
func (s *server) wrap(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		if r.ContentLength != 0 {
			rec.body = &bodyReader{ReadCloser: r.Body}
			r.Body = rec.body
		}
		rec.Header().Set("Cache-Control", "no-store")
		rec.Header().Set("X-Content-Type-Options", "nosniff")

		defer func() {
			// The mux sets the pattern it routed the request to: "" for
			// none, and before it serves, so a handler's panic has it too.
			pattern := r.Pattern
			v := recover()
			// Once part of a response is out it cannot be taken back:
			// cutting the connection is the only way to say it failed.
			abort := v == http.ErrAbortHandler || (v != nil && rec.status != 0)
			if v != nil && v != http.ErrAbortHandler {
				s.logger.Error("panic", "method", r.Method, "pattern", pattern, "panic", v, "stack", string(debug.Stack()))
			}
			if v != nil && !abort {
				writeError(rec, http.StatusInternalServerError, "Internal server error")
			}
			status := rec.status
			switch {
			case status == 0 && r.Context().Err() != nil:
				status = 499 // the client went away before an answer
			case status == 0:
				status = http.StatusOK
			}
			// A client chooses the method and the path, and so the
			// size of the line: each is cut at maxLogField bytes.
			attrs := []any{"method", truncate(r.Method, maxLogField), "pattern", pattern, "status", status, "duration", time.Since(start)}
			if pattern == "" {
				attrs = append(attrs, "path", truncate(r.URL.Path, maxLogField))
			}
			if abort {
				s.logger.Info("request", append(attrs, "aborted", true)...)
				panic(http.ErrAbortHandler)
			}
			s.logger.Info("request", attrs...)
		}()

		if s.loopbackHostsOnly && !isLoopbackHost(r.Host) {
			writeError(rec, http.StatusMisdirectedRequest, "Misdirected request")
			return
		}
		// The mux would answer a path that is not clean (//users,
		// /users/./1) with an HTML redirect, which a client would follow
		// for a POST as a GET without its body. No route has such a path.
		// Both forms: /users/%2F is clean as sent, but routes as /users//.
		if !isCleanPath(r.URL.EscapedPath()) || !isCleanPath(r.URL.Path) {
			writeError(rec, http.StatusNotFound, "Not Found")
			return
		}
		mux.ServeHTTP(rec, r)
	})
}

// isCleanPath reports whether p, a request's escaped path, is in the form
// the mux serves without a redirect: rooted, with no empty, "." or ".."
// segment (a final slash aside).
func isCleanPath(p string) bool {
	if !strings.HasPrefix(p, "/") {
		return false
	}
	clean := path.Clean(p)
	if strings.HasSuffix(p, "/") && clean != "/" {
		clean += "/"
	}
	return clean == p
}

// requireToken lets a request through only if it carries the API token as a
// bearer token.
func (s *server) requireToken(next http.Handler) http.Handler {
	// Comparing digests in constant time leaks neither the token's bytes nor
	// its length through timing.
	want := sha256.Sum256([]byte(s.apiToken))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		got := sha256.Sum256([]byte(token))
		if !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", "Bearer")
			// A client without the token has nothing more to ask: its
			// connection is closed rather than held for it.
			w.Header().Set("Connection", "close")
			writeError(w, http.StatusUnauthorized, "Not authenticated")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// requireJSON answers 415 to a request whose body is not labelled JSON. A
// browser cannot send that label to another site without asking first (a
// CORS preflight, which the service never allows), so no web page can make
// its visitor's browser create or change users.
func requireJSON(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isJSONType(r.Header.Values("Content-Type")) {
			writeError(w, http.StatusUnsupportedMediaType, "Unsupported media type")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// isJSONType reports whether the Content-Type header lines say JSON: one
// line, application/json in any case, with any parameters but a charset
// other than UTF-8.
func isJSONType(lines []string) bool {
	if len(lines) != 1 {
		return false
	}
	mediaType, params, err := mime.ParseMediaType(lines[0])
	if err != nil || mediaType != "application/json" {
		return false
	}
	charset, ok := params["charset"]
	return !ok || strings.EqualFold(charset, "utf-8")
}

// isLoopbackHost reports whether host, a request's Host, names a loopback
// host: localhost, an address in 127.0.0.0/8 or [::1], with any port.
func isLoopbackHost(host string) bool {
	name := host
	if i := strings.LastIndexByte(host, ':'); i >= 0 && !strings.Contains(host[i:], "]") {
		name = host[:i]
		if strings.Trim(host[i+1:], "0123456789") != "" {
			return false
		}
	}
	if strings.EqualFold(name, "localhost") {
		return true
	}
	bracketed := strings.HasPrefix(name, "[") && strings.HasSuffix(name, "]")
	if bracketed {
		name = name[1 : len(name)-1]
	}
	addr, err := netip.ParseAddr(name)
	return err == nil && addr.Is6() == bracketed && addr.Zone() == "" && addr.IsLoopback()
}

// statusRecorder remembers the status of the response it writes, closes
// the connection of a request whose body is left unread, and gives the
// plain-text error answers of net/http (the mux's 404 and 405) a JSON body,
// {"detail": "<status text>"}, keeping their status and headers.
type statusRecorder struct {
	http.ResponseWriter
	status   int
	body     *bodyReader // nil if the request has no body
	replaced bool        // whether a plain-text error body is being dropped
}

func (rec *statusRecorder) WriteHeader(status int) {
	if status >= 400 && strings.HasPrefix(rec.Header().Get("Content-Type"), "text/plain") {
		writeError(rec, status, http.StatusText(status)) // back here, now as JSON
		rec.replaced = true
		return
	}
	if rec.status == 0 {
		rec.status = status
		// Before it answers, net/http would wait for a body left unread
		// (up to 256 KiB), to keep the connection for another request. A
		// client that declares a body and never sends it would hold its
		// connection, and a MAX_CLIENTS place, for the whole ReadTimeout.
		// With the read deadline past, net/http gives up at once and
		// closes the connection after the answer.
		if rec.body != nil && !rec.body.eof {
			http.NewResponseController(rec.ResponseWriter).SetReadDeadline(time.Now())
		}
	}
	rec.ResponseWriter.WriteHeader(status)
}

func (rec *statusRecorder) Write(b []byte) (int, error) {
	if rec.replaced {
		return len(b), nil
	}
	if rec.status == 0 {
		rec.WriteHeader(http.StatusOK)
	}
	return rec.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (rec *statusRecorder) Unwrap() http.ResponseWriter { return rec.ResponseWriter }

// Flush keeps the wrapped writer an http.Flusher for handlers that ask.
func (rec *statusRecorder) Flush() {
	if rec.status == 0 {
		rec.WriteHeader(http.StatusOK)
	}
	http.NewResponseController(rec.ResponseWriter).Flush()
}

// bodyReader notes whether a request body was read to its end.
type bodyReader struct {
	io.ReadCloser
	eof bool
}

func (b *bodyReader) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.eof = b.eof || err == io.EOF
	return n, err
}

// Handlers.

func (s *server) health(w http.ResponseWriter, r *http.Request) {
	if err := s.store.Ping(r.Context()); err != nil {
		s.logger.Warn("health check failed", "err", err)
		writeUnavailable(w)
		return
	}
	encode(w, http.StatusOK, map[string]string{"status": "ok"})
}

// openAPI describes the API; TestOpenAPIDescribesEveryRoute and the check of
// every answer in the tests keep it true to the code.
//
//go:embed openapi.json
var openAPI []byte

func serveOpenAPI(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Write(openAPI)
}

// docsPage renders /openapi.json with Swagger UI from a public CDN, as
// FastAPI's /docs does. The files are pinned to one release and to their
// SHA-384 hashes (Subresource Integrity): changed files, on the CDN or in
// the package, would otherwise run on this origin and see any token typed
// into Authorize. To move to another release, change the version and the
// hashes together; .ci/run checks the hashes against the npm package.
const docsPage = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>users API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui.css" integrity="sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I" crossorigin="anonymous">
</head>
<body>
<div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui-bundle.js" integrity="sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9" crossorigin="anonymous"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body>
</html>
`

func serveDocs(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	io.WriteString(w, docsPage)
}

func (s *server) createUser(w http.ResponseWriter, r *http.Request) {
	in, ok := readUserInput(w, r, true)
	if !ok {
		return
	}
	// Hash before the store takes a connection: a hash is slow on purpose.
	hash, err := s.hasher.hash(r.Context(), *in.Password)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	u, err := s.store.CreateUser(r.Context(), newUser{
		FirstName: *in.FirstName, LastName: *in.LastName, Email: *in.Email, PasswordHash: hash,
	})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/users/"+strconv.FormatInt(u.ID, 10))
	encode(w, http.StatusCreated, u)
}

func (s *server) getUser(w http.ResponseWriter, r *http.Request) {
	id, ok := parseUserID(r.PathValue("id"))
	if !ok {
		writeError(w, http.StatusNotFound, "User not found")
		return
	}
	u, err := s.store.User(r.Context(), id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	encode(w, http.StatusOK, u)
}

func (s *server) updateUser(w http.ResponseWriter, r *http.Request) {
	id, ok := parseUserID(r.PathValue("id"))
	if !ok {
		writeError(w, http.StatusNotFound, "User not found")
		return
	}
	in, ok := readUserInput(w, r, false)
	if !ok {
		return
	}
	change := userUpdate{FirstName: in.FirstName, LastName: in.LastName, Email: in.Email}
	if in.Password != nil {
		hash, err := s.hasher.hash(r.Context(), *in.Password)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		change.PasswordHash = &hash
	}
	u, err := s.store.UpdateUser(r.Context(), id, change)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	encode(w, http.StatusOK, u)
}

func (s *server) deleteUser(w http.ResponseWriter, r *http.Request) {
	id, ok := parseUserID(r.PathValue("id"))
	if !ok {
		writeError(w, http.StatusNotFound, "User not found")
		return
	}
	if err := s.store.DeleteUser(r.Context(), id); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// authenticate checks an email and password. Wrong passwords and unknown
// addresses get one answer after the same work, and both are throttled per
// address (see CountAuthFailure). A success with a hash at another cost
// than the configured one stores a new hash.
func (s *server) authenticate(w http.ResponseWriter, r *http.Request) {
	in, ok := readCredentials(w, r)
	if !ok {
		return
	}
	// An early attempt is turned away before it queues for a hashing slot.
	if wait, err := s.store.AuthWait(r.Context(), in.email); err != nil || wait > 0 {
		s.throttled(w, r, wait, err)
		return
	}
	u, stored, err := s.store.Credentials(r.Context(), in.email)
	if err != nil && !errors.Is(err, errNotFound) {
		s.fail(w, r, err)
		return
	}
	release, err := s.hasher.acquire(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	// Counted with the slot held, so that a 503 for a busy hasher counts
	// nothing, and checked again, since the wait may have begun meanwhile.
	if wait, err := s.store.CountAuthFailure(r.Context(), in.email); err != nil || wait > 0 {
		release()
		s.throttled(w, r, wait, err)
		return
	}
	match := s.hasher.matches(stored, in.password)
	var newHash string
	var rehashErr error
	if match && s.hasher.outdated(stored) {
		newHash, rehashErr = s.hasher.hashHeld(in.password)
	}
	release()
	if !match {
		writeError(w, http.StatusBadRequest, "Invalid email or password")
		return
	}
	// The check is done and the password is right: that is the answer,
	// whether or not the client still waits for it. Resetting the count and
	// rehashing are bookkeeping done on its behalf, so a client that leaves
	// cannot leave a right password counted as a failure. If they fail
	// (the database is going away, say), the next success tries again.
	ctx := context.WithoutCancel(r.Context())
	if err := s.store.ResetAuthFailures(ctx, in.email); err != nil {
		s.logger.Warn("reset failed sign-ins", "user_id", u.ID, "err", err)
	}
	if newHash != "" {
		_, rehashErr = s.store.RehashPassword(ctx, u.ID, stored, newHash)
	}
	if rehashErr != nil {
		s.logger.Warn("rehash password", "user_id", u.ID, "err", rehashErr)
	}
	encode(w, http.StatusOK, u)
}

// throttled answers an attempt to sign in that must wait, or whose
// throttle could not be read.
func (s *server) throttled(w http.ResponseWriter, r *http.Request, wait time.Duration, err error) {
	if err != nil {
		s.fail(w, r, err)
		return
	}
	seconds := (wait + time.Second - 1) / time.Second
	w.Header().Set("Retry-After", strconv.FormatInt(int64(seconds), 10))
	writeError(w, http.StatusTooManyRequests, "Too many failed attempts")
}

// listUsers answers a look-up by ?email=, one page if ?limit= is given,
// and otherwise every user (after ?after_id=, if given).
func (s *server) listUsers(w http.ResponseWriter, r *http.Request) {
	q, problems := parseListQuery(r.URL.RawQuery)
	switch {
	case len(problems) > 0:
		writeInvalid(w, problems)
	case q.email != "":
		s.userByEmail(w, r, q.email)
	case q.limit > 0:
		s.usersPage(w, r, q)
	case r.Method == http.MethodHead:
		s.headUsers(w, r, q)
	default:
		s.allUsers(w, r, q)
	}
}

// userByEmail answers a look-up by email: a list of one user, or 404.
func (s *server) userByEmail(w http.ResponseWriter, r *http.Request, email string) {
	u, err := s.store.UserByEmail(r.Context(), email)
	if errors.Is(err, errNotFound) {
		writeError(w, http.StatusNotFound, "No users found")
		return
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	encode(w, http.StatusOK, []user{u})
}

// usersPage answers one page of users, with a Link to the next one if the
// page is full.
func (s *server) usersPage(w http.ResponseWriter, r *http.Request, q listQuery) {
	page, err := s.store.Users(r.Context(), q.afterID, q.limit)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if len(page) == q.limit {
		next := url.Values{}
		next.Set("limit", strconv.Itoa(q.limit))
		next.Set("after_id", strconv.FormatInt(page[len(page)-1].ID, 10))
		w.Header().Set("Link", fmt.Sprintf(`<%s?%s>; rel="next"`, r.URL.Path, next.Encode()))
	}
	encode(w, http.StatusOK, page)
}

// headUsers answers HEAD for the whole list: the status and headers a GET
// would get, which takes one user to know, not the table.
func (s *server) headUsers(w http.ResponseWriter, r *http.Request, q listQuery) {
	if len(s.streams) == cap(s.streams) {
		writeUnavailable(w) // as a GET would be answered now
		return
	}
	first, err := s.store.Users(r.Context(), q.afterID, 1)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if len(first) == 0 && !q.given {
		writeError(w, http.StatusNotFound, "No users found")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
}

// allUsers streams every user after q.afterID as one JSON array, a batch
// at a time: each batch is read into buf and the connection given back
// before the batch is sent. Once the 200 is out, a failure can only be told
// by cutting the stream short.
func (s *server) allUsers(w http.ResponseWriter, r *http.Request, q listQuery) {
	// A stream lasts as long as its client cares to read: each holds a
	// slot, and when none is free the client is asked to come back.
	select {
	case s.streams <- struct{}{}:
		defer func() { <-s.streams }()
	default:
		s.logger.Warn("list users: every stream slot is taken", "max_streams", s.maxStreams)
		writeUnavailable(w)
		return
	}

	buf := s.batches.Get().(*bytes.Buffer)
	defer s.batches.Put(buf)
	enc := json.NewEncoder(buf)
	sent, afterID := 0, q.afterID
	// readBatch encodes the next batch into buf, each user preceded by a
	// comma but the first, and reports whether more users follow: it reads
	// one user more than it encodes, to know that without asking the
	// database for an empty batch.
	readBatch := func() (more bool, err error) {
		buf.Reset()
		n := 0
		err = s.store.EachUser(r.Context(), afterID, listBatchSize+1, func(u *user) {
			if n++; n > listBatchSize {
				more = true
				return
			}
			if sent > 0 {
				buf.WriteByte(',')
			}
			sent++
			afterID = u.ID
			enc.Encode(u)               // a user always encodes
			buf.Truncate(buf.Len() - 1) // and its newline goes: the array stays one line
		})
		return more, err
	}

	more, err := readBatch()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if sent == 0 && !q.given {
		writeError(w, http.StatusNotFound, "No users found")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	io.WriteString(w, "[")
	for {
		if !more {
			buf.WriteString("]\n")
		}
		for b := buf.Bytes(); len(b) > 0; b = b[min(len(b), listChunk):] {
			rc.SetWriteDeadline(time.Now().Add(s.streamStall))
			if _, err := w.Write(b[:min(len(b), listChunk)]); err != nil {
				s.logger.Info("list users: client stopped reading", "err", err)
				panic(http.ErrAbortHandler)
			}
		}
		if !more {
			return
		}
		// Send what is buffered before the next query.
		if err := rc.Flush(); err != nil {
			s.logger.Info("list users: client stopped reading", "err", err)
			panic(http.ErrAbortHandler)
		}
		if more, err = readBatch(); err != nil {
			if r.Context().Err() == nil {
				s.logger.Error("list users: read next batch", "err", err)
			}
			panic(http.ErrAbortHandler)
		}
	}
}

// Reading and validating input.

// listQuery is a parsed ?limit=&after_id= or ?email= query.
type listQuery struct {
	limit   int    // 0: no limit
	afterID int64  // 0: from the start
	email   string // normalized; "": no look-up by email
	given   bool   // whether any parameter was given
}

// parseListQuery parses the query string of GET /users and reports what is
// wrong with it, by parameter.
func parseListQuery(rawQuery string) (listQuery, map[string]string) {
	var q listQuery
	v, err := url.ParseQuery(rawQuery)
	if err != nil {
		return q, map[string]string{"query": "is not a valid query string"}
	}
	problems := make(map[string]string)
	for name, values := range v {
		q.given = true
		if len(values) > 1 {
			problems[name] = "must be given at most once"
			continue
		}
		n, ok := parseNumber(values[0])
		switch name {
		case "limit":
			if !ok || n < 1 || n > maxPageSize {
				problems[name] = fmt.Sprintf("must be an integer from 1 to %d", maxPageSize)
			}
			q.limit = int(n)
		case "after_id":
			if !ok {
				problems[name] = "must be a non-negative integer"
			}
			q.afterID = n
		case "email":
			var problem string
			if q.email, problem = cleanEmail(values[0]); problem != "" {
				problems[name] = problem
			}
		default:
			problems[name] = "unknown parameter"
		}
	}
	if q.email != "" && (v.Has("limit") || v.Has("after_id")) {
		problems["email"] = "cannot be combined with limit or after_id"
	}
	return q, problems
}

// parseUserID parses a user id: a positive integer that fits int64.
func parseUserID(s string) (int64, bool) {
	id, ok := parseNumber(s)
	return id, ok && id > 0
}

// parseNumber parses a non-negative decimal integer that fits int64, written
// in digits only (strconv.ParseInt alone would accept a sign).
func parseNumber(s string) (int64, bool) {
	if s == "" || s[0] < '0' || s[0] > '9' {
		return 0, false
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

// userInput is the body of a create or an update. A nil field was absent or
// null.
type userInput struct {
	FirstName, LastName, Email, Password *string
}

// readUserInput reads, decodes and validates the request body. If the body
// is not acceptable it answers the request itself and returns false.
func readUserInput(w http.ResponseWriter, r *http.Request, create bool) (userInput, bool) {
	var in userInput
	fields, ok := readObject(w, r)
	if !ok {
		return in, false
	}
	problems := in.decode(fields)
	for name, problem := range in.validate(create) {
		if _, ok := problems[name]; !ok {
			problems[name] = problem
		}
	}
	if len(problems) > 0 {
		writeInvalid(w, problems)
		return in, false
	}
	return in, true
}

// readObject reads the request body: one JSON object in UTF-8, at most
// maxBodyBytes long, that names each member once. If the body is not that,
// readObject answers the request itself and returns false.
func readObject(w http.ResponseWriter, r *http.Request) (map[string]json.RawMessage, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, "Request body too large")
		return nil, false
	case err != nil:
		writeInvalid(w, map[string]string{"body": "could not be read"})
		return nil, false
	}
	// encoding/json would quietly turn invalid UTF-8 into U+FFFD.
	if !utf8.Valid(body) {
		writeInvalid(w, map[string]string{"body": "must be valid UTF-8"})
		return nil, false
	}
	fields, repeated, ok := decodeObject(body)
	if !ok {
		writeInvalid(w, map[string]string{"body": "must be one JSON object"})
		return nil, false
	}
	if len(repeated) > 0 {
		writeInvalid(w, repeated)
		return nil, false
	}
	return fields, true
}

// decodeObject decodes body as one JSON object, and reports each member
// name given more than once: encoding/json keeps the last value, other
// parsers (a proxy's, say) may keep the first, so such a body is refused.
func decodeObject(body []byte) (fields map[string]json.RawMessage, repeated map[string]string, ok bool) {
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, false
	}
	fields = make(map[string]json.RawMessage)
	repeated = make(map[string]string)
	for dec.More() {
		tok, err := dec.Token()
		name, isName := tok.(string)
		if err != nil || !isName {
			return nil, nil, false
		}
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return nil, nil, false
		}
		if _, seen := fields[name]; seen {
			repeated[name] = "given more than once"
		}
		fields[name] = value
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, nil, false
	}
	// Nothing but white space may follow the object.
	rest := bytes.TrimLeft(body[dec.InputOffset():], " \t\r\n")
	return fields, repeated, len(rest) == 0
}

// decode fills in from the fields of a JSON object and reports what is
// wrong with them. Names must match exactly (encoding/json alone would match
// them case-insensitively), and each value must be a string or null.
func (in *userInput) decode(fields map[string]json.RawMessage) map[string]string {
	problems := make(map[string]string)
	for name, value := range fields {
		v, ok := decodeString(value)
		switch name {
		case "first_name":
			in.FirstName = v
		case "last_name":
			in.LastName = v
		case "email":
			in.Email = v
		case "password":
			in.Password = v
		default:
			problems[name] = "unknown field"
			continue
		}
		if !ok {
			problems[name] = "must be a string"
		}
	}
	return problems
}

// decodeString decodes a JSON string or null (nil), and reports whether
// value was either.
func decodeString(value json.RawMessage) (*string, bool) {
	var s *string
	err := json.Unmarshal(value, &s)
	return s, err == nil
}

// validate normalizes the fields that are set (trimming names and email,
// lower-casing email) and reports what is wrong with them. On create every
// field is required.
func (in *userInput) validate(create bool) map[string]string {
	problems := make(map[string]string)
	check := func(name string, value *string, clean func(string) (string, string)) *string {
		if value == nil {
			if create {
				problems[name] = "required"
			}
			return nil
		}
		cleaned, problem := clean(*value)
		if problem != "" {
			problems[name] = problem
		}
		return &cleaned
	}
	in.FirstName = check("first_name", in.FirstName, cleanName)
	in.LastName = check("last_name", in.LastName, cleanName)
	in.Email = check("email", in.Email, cleanEmail)
	in.Password = check("password", in.Password, func(s string) (string, string) { return s, checkPassword(s) })
	return problems
}

// credentials is the body of POST /users/authenticate, with the email
// normalized.
type credentials struct{ email, password string }

// readCredentials reads and decodes the body of POST /users/authenticate.
// Both fields are required strings. The password has no length rule: a
// wrong one of any length gets the same answer as any other. If the body
// is not acceptable it answers the request itself and returns false.
func readCredentials(w http.ResponseWriter, r *http.Request) (credentials, bool) {
	fields, ok := readObject(w, r)
	if !ok {
		return credentials{}, false
	}
	var in credentials
	problems := make(map[string]string)
	for name, value := range fields {
		v, ok := decodeString(value)
		switch {
		case name != "email" && name != "password":
			problems[name] = "unknown field"
		case !ok:
			problems[name] = "must be a string"
		case v == nil:
			problems[name] = "required"
		case name == "email":
			var problem string
			if in.email, problem = cleanEmail(*v); problem != "" {
				problems[name] = problem
			}
		default:
			in.password = *v
		}
	}
	for _, name := range []string{"email", "password"} {
		if _, given := fields[name]; !given {
			problems[name] = "required"
		}
	}
	if len(problems) > 0 {
		writeInvalid(w, problems)
		return credentials{}, false
	}
	return in, true
}

// cleanName trims a name and reports what is wrong with it, if anything.
func cleanName(s string) (string, string) {
	s = strings.TrimSpace(s)
	switch n := utf8.RuneCountInString(s); {
	case n == 0:
		return s, "must not be empty"
	case n > maxNameChars:
		return s, fmt.Sprintf("must be at most %d characters", maxNameChars)
	case strings.IndexFunc(s, unicode.IsControl) >= 0:
		return s, "must not contain control characters"
	case strings.ContainsRune(s, utf8.RuneError):
		// What encoding/json makes of an unpaired surrogate escape.
		return s, "must be valid Unicode text"
	}
	return s, ""
}

// cleanEmail trims and lower-cases an address and reports what is wrong with
// it, if anything. Addresses are compared, stored and unique in lower case.
func cleanEmail(s string) (string, string) {
	s = strings.TrimSpace(s)
	if len(s) > maxEmailBytes {
		return s, fmt.Sprintf("must be at most %d bytes", maxEmailBytes)
	}
	// Lower case can take more bytes than upper case (Ⱥ, ⱥ): check again.
	if s = strings.ToLower(s); len(s) > maxEmailBytes {
		return s, fmt.Sprintf("must be at most %d bytes", maxEmailBytes)
	}
	if !validEmail(s) {
		return s, "must be a plain email address such as ann@example.com"
	}
	return s, ""
}

// validEmail reports whether s is an address as python-email-validator
// accepts it by default, which is what strict clients expect of an email:
//
//   - a local part of 1 to 64 bytes, dot-separated atoms of ASCII atext or
//     non-ASCII letters and digits; no quoted strings, no comments;
//   - a domain of at most 253 bytes and at least two labels, each 1 to 63
//     bytes of letters, digits and hyphens (non-ASCII letters and digits
//     too), not starting or ending with a hyphen; the last label is not all
//     digits, and there are no IP literals.
//
// Combining marks are allowed after the first character of an atom or a
// label, since many scripts (and decomposed accents) need them.
func validEmail(s string) bool {
	local, domain, ok := strings.Cut(s, "@")
	if !ok || len(local) > 64 || len(domain) > 253 {
		return false
	}
	for _, atom := range strings.Split(local, ".") {
		if !emailWord(atom, isAtext) {
			return false
		}
	}
	labels := strings.Split(domain, ".")
	if len(labels) < 2 {
		return false
	}
	for _, label := range labels {
		if len(label) > 63 || !emailWord(label, isLabelASCII) || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
	}
	return strings.IndexFunc(labels[len(labels)-1], func(r rune) bool { return !unicode.IsDigit(r) }) >= 0
}

// emailWord reports whether s, an atom or a label, is not empty and holds
// only ASCII characters that ascii allows, non-ASCII letters and digits,
// and combining marks after its first character.
func emailWord(s string, ascii func(rune) bool) bool {
	for i, r := range s {
		switch {
		case r < utf8.RuneSelf:
			if !ascii(r) {
				return false
			}
		case unicode.IsLetter(r) || unicode.IsDigit(r):
		case unicode.IsMark(r) && i > 0:
		default:
			return false
		}
	}
	return s != ""
}

// isAtext reports whether r is an RFC 5322 atext character.
func isAtext(r rune) bool {
	return isLabelASCII(r) || strings.ContainsRune("!#$%&'*+/=?^_`{|}~", r)
}

// isLabelASCII reports whether r is an ASCII letter, digit or hyphen.
func isLabelASCII(r rune) bool {
	return 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || r == '-'
}

// checkPassword reports what is wrong with a password, if anything. There
// are no composition rules, per NIST SP 800-63B.
func checkPassword(s string) string {
	switch {
	case strings.IndexFunc(s, unicode.IsControl) >= 0:
		// C implementations of bcrypt stop at NUL: the hash would not
		// carry over to them. No other control character is typed.
		return "must not contain control characters"
	case strings.ContainsRune(s, utf8.RuneError):
		// What encoding/json makes of an unpaired surrogate escape: the
		// hash would not be of the password the client sent.
		return "must be valid Unicode text"
	case utf8.RuneCountInString(s) < minPasswordChars:
		return fmt.Sprintf("must be at least %d characters", minPasswordChars)
	case len(s) > maxPasswordBytes:
		return fmt.Sprintf("must be at most %d bytes", maxPasswordBytes)
	}
	return ""
}

// Writing answers.

// fail answers a request whose work failed with err.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, errNotFound):
		writeError(w, http.StatusNotFound, "User not found")
	case errors.Is(err, errEmailTaken):
		writeError(w, http.StatusBadRequest, "Email already registered")
	case r.Context().Err() != nil:
		// The client went away, or closed its side: an answer would at best
		// reach no one, and an empty one would read as a 200. Cutting the
		// connection says the work was not done.
		s.logger.Info("request canceled", "method", r.Method, "path", r.URL.Path, "err", err)
		panic(http.ErrAbortHandler)
	case errors.Is(err, errBusy):
		writeUnavailable(w)
	case errors.Is(err, errUnavailable):
		s.logger.Warn("database unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
		writeUnavailable(w)
	default:
		s.logger.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusInternalServerError, "Internal server error")
	}
}

// errorBody is every error response. Errors lists field problems, for 400
// Invalid data only; it never repeats the rejected value.
type errorBody struct {
	Detail string            `json:"detail"`
	Errors map[string]string `json:"errors,omitempty"`
}

func writeError(w http.ResponseWriter, status int, detail string) {
	encode(w, status, errorBody{Detail: detail})
}

// writeUnavailable answers 503: the work was not done, and may succeed if
// tried again in Retry-After seconds.
func writeUnavailable(w http.ResponseWriter) {
	w.Header().Set("Retry-After", retryAfter)
	writeError(w, http.StatusServiceUnavailable, "Service unavailable")
}

func writeInvalid(w http.ResponseWriter, problems map[string]string) {
	encode(w, http.StatusBadRequest, errorBody{Detail: "Invalid data", Errors: capProblems(problems)})
}

// capProblems bounds what an error body echoes of the names a client chose:
// at most maxErrorEntries problems, each name cut to maxErrorName bytes, and
// no more than fits in an answer of maxErrorBytes. Problems with fields the
// service knows come first, then names it does not know, each in name order.
func capProblems(problems map[string]string) map[string]string {
	names := make([]string, 0, len(problems))
	for name := range problems {
		names = append(names, name)
	}
	unknown := func(name string) bool {
		p := problems[name]
		return p == "unknown field" || p == "unknown parameter"
	}
	sort.Slice(names, func(i, j int) bool {
		if ui, uj := unknown(names[i]), unknown(names[j]); ui != uj {
			return uj
		}
		return names[i] < names[j]
	})
	kept := make(map[string]string)
	// The room left once detail and the braces are written.
	room := maxErrorBytes - len(`{"detail":"Invalid data","errors":{}}`+"\n")
	for _, name := range names {
		if len(kept) == maxErrorEntries {
			break
		}
		short := cutName(name)
		if _, ok := kept[short]; ok {
			continue
		}
		k, _ := json.Marshal(short)
		v, _ := json.Marshal(problems[name])
		size := len(k) + 1 + len(v) // "name":"problem"
		if len(kept) > 0 {
			size++ // the comma
		}
		if size > room {
			continue
		}
		room -= size
		kept[short] = problems[name]
	}
	return kept
}

// cutName cuts a name longer than maxErrorName bytes and marks the cut with
// an ellipsis.
func cutName(name string) string {
	if len(name) <= maxErrorName {
		return name
	}
	return truncate(name, maxErrorName) + "…"
}

// truncate returns s cut to at most n bytes, at a character's start.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// encode answers with v as JSON.
func encode(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		panic(err) // every type the handlers send encodes
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"mime"
	"net/http"
	"net/netip"
	"net/url"
	"path"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
)

// This file is the HTTP surface: the routes and the handler constructor;
// the handlers; reading and validating input; writing answers; and last the
// middleware every request passes through, the service's armor.

// Limits on what clients send, and on what the service sends back.
const (
	maxBodyBytes     = 1 << 20 // a request body
	maxNameChars     = 128     // first_name and last_name, in characters
	maxEmailBytes    = 254     // an address, per RFC 5321's path limit
	minPasswordChars = 8       // NIST SP 800-63B's floor
	maxPageSize      = 1000    // ?limit=

	// An error body echoes names the client chose (unknown fields and
	// query parameters): at most maxErrorEntries, cut to maxErrorName bytes.
	maxErrorEntries = 20
	maxErrorName    = 64

	// maxLogField is how much of a method or a path a log line keeps, and
	// maxRequestID the longest X-Request-Id taken from a client.
	maxLogField  = 200
	maxRequestID = 128
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

// retryAfter is the Retry-After of every 503, and of a 429 for a client's
// share of the hashing slots, in seconds: hashing slots free
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
	// Request ids the service makes are idPrefix and a count.
	idPrefix string
	requests atomic.Uint64
	batches  sync.Pool // *bytes.Buffer: a list stream's batch, kept for the next
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
	// trustedProxies are the peers whose X-Forwarded-For names the client.
	trustedProxies []netip.Prefix
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
		streams: make(chan struct{}, opts.maxStreams), idPrefix: rand.Text()[:10] + "-"}
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
	return s.wrap(onlyPost("/users/authenticate", mux))
}

// Handlers.

// health answers whether the database answers. The check is bounded by
// the store, not by the client: net/http ends a request's context when the
// client half-closes its connection, as some probes do after sending.
func (s *server) health(w http.ResponseWriter, r *http.Request) {
	if err := s.store.Ping(context.WithoutCancel(r.Context())); err != nil {
		s.log(w, r).Warn("health check failed", "err", err)
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
// Without the CDN (offline, a strict proxy) the page says so and links the
// description; Swagger UI replaces that text when it loads.
const docsPage = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>users API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui.css" integrity="sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I" crossorigin="anonymous">
</head>
<body>
<div id="swagger-ui">
<h1>users API</h1>
<p>Swagger UI, from cdn.jsdelivr.net, shows the API's description here. Without it,
read the description itself: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).</p>
</div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui-bundle.js" integrity="sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9" crossorigin="anonymous"></script>
<script>if (window.SwaggerUIBundle) SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body>
</html>
`

func serveDocs(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	io.WriteString(w, docsPage)
}

func (s *server) createUser(w http.ResponseWriter, r *http.Request) {
	in, ok := readUserInput(w, r, true)
	if !ok || !s.nfc(w, r, in.Email) {
		return
	}
	// Hash before the store takes a connection: a hash is slow on purpose.
	hash, err := s.hasher.hash(r.Context(), s.client(r), *in.Password)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	u, err := s.store.CreateUser(r.Context(), newUser{
		FirstName: *in.FirstName, LastName: *in.LastName, Email: *in.Email, Password: hash,
	})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/users/"+strconv.FormatInt(u.ID, 10))
	encodeUser(w, http.StatusCreated, u)
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
	// If-None-Match compares weakly: W/"1" matches "1".
	versions, star := tagVersions(r.Header.Values("If-None-Match"), true)
	if star || slices.Contains(versions, u.Version) {
		w.Header().Set("ETag", etag(u))
		w.WriteHeader(http.StatusNotModified)
		return
	}
	encodeUser(w, http.StatusOK, u)
}

func (s *server) updateUser(w http.ResponseWriter, r *http.Request) {
	id, ok := parseUserID(r.PathValue("id"))
	if !ok {
		writeError(w, http.StatusNotFound, "User not found")
		return
	}
	in, ok := readUserInput(w, r, false)
	if !ok || !s.nfc(w, r, in.Email) {
		return
	}
	versions, _ := tagVersions(r.Header.Values("If-Match"), false)
	change := userUpdate{FirstName: in.FirstName, LastName: in.LastName, Email: in.Email, Versions: versions}
	if in.Password != nil {
		hash, err := s.hasher.hash(r.Context(), s.client(r), *in.Password)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		change.Password = &hash
		// The names and email the body leaves out are the stored ones: the
		// password is checked against the user as changed, before commit.
		change.Check = func(u user) error {
			if closeToAccount(*in.Password, &u.FirstName, &u.LastName, &u.Email) {
				return errCloseToAccount
			}
			return nil
		}
	}
	u, err := s.store.UpdateUser(r.Context(), id, change)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	encodeUser(w, http.StatusOK, u)
}

func (s *server) deleteUser(w http.ResponseWriter, r *http.Request) {
	id, ok := parseUserID(r.PathValue("id"))
	if !ok {
		writeError(w, http.StatusNotFound, "User not found")
		return
	}
	versions, _ := tagVersions(r.Header.Values("If-Match"), false)
	if err := s.store.DeleteUser(r.Context(), id, versions); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
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
	if !s.nfc(w, r, &email) {
		return
	}
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
		s.log(w, r).Warn("list users: every stream slot is taken", "max_streams", s.maxStreams)
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
				s.log(w, r).Info("list users: client stopped reading", "err", err)
				panic(http.ErrAbortHandler)
			}
		}
		if !more {
			return
		}
		// Send what is buffered before the next query.
		if err := rc.Flush(); err != nil {
			s.log(w, r).Info("list users: client stopped reading", "err", err)
			panic(http.ErrAbortHandler)
		}
		if more, err = readBatch(); err != nil {
			if r.Context().Err() == nil {
				s.log(w, r).Error("list users: read next batch", "err", err)
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
	problems, ok := decode(w, r, map[string]**string{
		"first_name": &in.FirstName, "last_name": &in.LastName, "email": &in.Email, "password": &in.Password})
	if !ok {
		return in, false
	}
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

// decode reads the request body, one JSON object in UTF-8 of at most
// maxBodyBytes, into fields: each member must be one of them, named once
// and exactly (encoding/json alone would match names in any case, and keep
// the last of a repeated name where a proxy may keep the first), with a
// string or null (nil) value. It returns what is wrong with the members.
// If the body is not such an object it answers the request and returns false.
func decode(w http.ResponseWriter, r *http.Request, fields map[string]**string) (map[string]string, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, "Request body too large")
		return nil, false
	case err != nil:
		writeInvalid(w, map[string]string{"body": "could not be read"})
		return nil, false
	case !utf8.Valid(body): // encoding/json would quietly make it U+FFFD
		writeInvalid(w, map[string]string{"body": "must be valid UTF-8"})
		return nil, false
	}
	problems := make(map[string]string)
	seen := make(map[string]bool)
	dec := json.NewDecoder(bytes.NewReader(body))
	tok, err := dec.Token()
	ok := err == nil && tok == json.Delim('{')
	for ok && dec.More() {
		tok, err := dec.Token()
		name, isName := tok.(string)
		var value json.RawMessage
		if ok = err == nil && isName && dec.Decode(&value) == nil; !ok {
			break
		}
		field, known := fields[name]
		switch {
		case seen[name]:
			problems[name] = "given more than once"
		case !known:
			problems[name] = "unknown field"
		case json.Unmarshal(value, field) != nil:
			problems[name] = "must be a string"
		}
		seen[name] = true
	}
	if _, err := dec.Token(); !ok || err != nil || len(bytes.TrimLeft(body[dec.InputOffset():], " \t\r\n")) > 0 {
		writeInvalid(w, map[string]string{"body": "must be one JSON object"})
		return nil, false
	}
	return problems, true
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
	if _, bad := problems["password"]; !bad && in.Password != nil && closeToAccount(*in.Password, in.FirstName, in.LastName, in.Email) {
		problems["password"] = closeToAccountProblem
	}
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
	var email, password *string
	problems, ok := decode(w, r, map[string]**string{"email": &email, "password": &password})
	if !ok {
		return credentials{}, false
	}
	var in credentials
	if email != nil && problems["email"] == "" {
		var p string
		if in.email, p = cleanEmail(*email); p != "" {
			problems["email"] = p
		}
	}
	if password != nil {
		in.password = *password
	}
	for name, v := range map[string]*string{"email": email, "password": password} {
		if _, bad := problems[name]; !bad && v == nil {
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
	case strings.IndexFunc(s, isVisible) < 0:
		return s, "must contain a visible character"
	}
	return s, ""
}

// isVisible reports whether r shows as something: not a space, not a
// control character, not an invisible one.
func isVisible(r rune) bool {
	return unicode.IsGraphic(r) && !unicode.IsSpace(r) && !isInvisible(r)
}

// isInvisible reports whether r is a default-ignorable code point, which
// shows nothing: a format character (zero-width space, joiners, U+FEFF,
// the soft hyphen, bidirectional controls), a variation selector, a Hangul
// filler; or the blank Braille pattern, a symbol that shows as a space.
func isInvisible(r rune) bool {
	return r == '\u2800' || unicode.In(r, unicode.Cf, unicode.Variation_Selector, unicode.Other_Default_Ignorable_Code_Point)
}

// cleanEmail trims and lower-cases an address and reports what is wrong with
// it, if anything. Addresses are compared, stored and unique in lower case
// and, once the handler has called nfc, in NFC.
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
		case isInvisible(r):
			return false
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
	case commonPasswords[strings.ToLower(s)]:
		return "is too common: choose one that is harder to guess"
	}
	return ""
}

// commonPasswordsText is common-passwords.txt: lower-case passwords of at
// least minPasswordChars characters that people often choose, one per line,
// after comment lines that start with "#".
//
//go:embed common-passwords.txt
var commonPasswordsText string

// commonPasswords is the set of commonPasswordsText's passwords, which
// NIST SP 800-63B says a new password must not be.
var commonPasswords = func() map[string]bool {
	set := make(map[string]bool, strings.Count(commonPasswordsText, "\n"))
	for line := range strings.Lines(commonPasswordsText) {
		if !strings.HasPrefix(line, "#") {
			set[strings.TrimSuffix(line, "\n")] = true
		}
	}
	return set
}()

// closeToAccountProblem is the problem with a password that closeToAccount
// refuses; errCloseToAccount is the store's error for it on update.
const closeToAccountProblem = "is too close to the account's names or email: choose another"

var errCloseToAccount = errors.New("password too close to the account")

// closeToAccount reports whether password is, in any case, one of the
// account's words (its names and email address, NIST SP 800-63B's
// context-specific words) or what precedes an "@" in one. Nil is no word.
func closeToAccount(password string, words ...*string) bool {
	for _, w := range words {
		if w == nil {
			continue
		}
		if local, _, _ := strings.Cut(*w, "@"); strings.EqualFold(*w, password) || strings.EqualFold(local, password) {
			return true
		}
	}
	return false
}

// etag is the entity tag of u's representation: its version, quoted.
func etag(u user) string { return `"` + strconv.FormatInt(u.Version, 10) + `"` }

// tagVersions reads an If-Match or If-None-Match header, given as its lines:
// star if it is "*", otherwise the versions of the entity tags it lists
// (weak tags only if weak, for a weak comparison), nil if it is absent. A
// tag that is not one of this service's matches nothing.
func tagVersions(lines []string, weak bool) (versions []int64, star bool) {
	s := strings.Join(lines, ",")
	if len(lines) == 0 || strings.Trim(s, " \t") == "*" {
		return nil, len(lines) > 0
	}
	versions = []int64{}
	for {
		before, rest, ok := strings.Cut(s, `"`)
		tag, after, closed := strings.Cut(rest, `"`)
		if !ok || !closed {
			return versions, false
		}
		if v, ok := parseNumber(tag); ok && (weak || !strings.HasSuffix(before, "W/")) {
			versions = append(versions, v)
		}
		s = after
	}
}

// nfc puts *email, if not nil, in Unicode NFC, in which addresses are
// stored and compared: "ü" typed as one character or as u and a combining
// mark is one address. Go's standard library cannot normalize, PostgreSQL
// can. If it fails, nfc answers the request itself and returns false.
func (s *server) nfc(w http.ResponseWriter, r *http.Request, email *string) bool {
	// Below U+0300 no character combines or decomposes: such text is NFC.
	if email == nil || strings.IndexFunc(*email, func(c rune) bool { return c >= 0x300 }) < 0 {
		return true
	}
	normalized, err := s.store.NFC(r.Context(), *email)
	if err != nil {
		s.fail(w, r, err)
		return false
	}
	// A few characters grow in NFC (क़ becomes क and a nukta): check again.
	if _, problem := cleanEmail(normalized); problem != "" {
		writeInvalid(w, map[string]string{"email": problem})
		return false
	}
	*email = normalized
	return true
}

// Writing answers.

// fail answers a request whose work failed with err.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, errNotFound):
		writeError(w, http.StatusNotFound, "User not found")
	case errors.Is(err, errEmailTaken):
		writeError(w, http.StatusBadRequest, "Email already registered")
	case errors.Is(err, errStale):
		writeError(w, http.StatusPreconditionFailed, "Precondition failed: the user has changed")
	case errors.Is(err, errCloseToAccount):
		writeInvalid(w, map[string]string{"password": closeToAccountProblem})
	case r.Context().Err() != nil:
		// The client went away, or closed its side: an answer would at best
		// reach no one, and an empty one would read as a 200. Cutting the
		// connection says the work was not done.
		s.log(w, r).Info("request canceled", "err", err)
		panic(http.ErrAbortHandler)
	case errors.Is(err, errBusy):
		writeUnavailable(w)
	case errors.Is(err, errShare):
		w.Header().Set("Retry-After", retryAfter)
		writeError(w, http.StatusTooManyRequests, "Too many requests")
	case errors.Is(err, errUnavailable):
		s.log(w, r).Warn("database unavailable", "err", err)
		writeUnavailable(w)
	default:
		s.log(w, r).Error("internal error", "err", err)
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
// at most maxErrorEntries problems, those with known names first, each name
// cut to maxErrorName bytes and marked with an ellipsis.
func capProblems(problems map[string]string) map[string]string {
	key := func(name string) string {
		if strings.HasPrefix(problems[name], "unknown") {
			return "1" + name
		}
		return "0" + name
	}
	names := slices.SortedFunc(maps.Keys(problems), func(a, b string) int { return strings.Compare(key(a), key(b)) })
	kept := make(map[string]string)
	for _, name := range names[:min(len(names), maxErrorEntries)] {
		short := name
		if len(name) > maxErrorName {
			short = truncate(name, maxErrorName) + "…"
		}
		kept[short] = problems[name]
	}
	return kept
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

// encodeUser answers with u as JSON, and its ETag.
func encodeUser(w http.ResponseWriter, status int, u user) {
	w.Header().Set("ETag", etag(u))
	encode(w, status, u)
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

// Middleware, outermost first: each does one job.

// wrap adds what every request gets: an id and an access log line,
// recovery from panics, a prompt close of bodies left unread, security
// headers, the loopback Host check, refusal of unclean paths, and JSON
// bodies for the mux's own 404 and 405 answers.
func (s *server) wrap(mux http.Handler) http.Handler {
	h := refuseUncleanPaths(jsonErrors(mux))
	if s.loopbackHostsOnly {
		h = requireLoopbackHost(h)
	}
	return s.logRequests(closeUnreadBodies(s.recoverPanics(secureHeaders(h))))
}

// logRequests gives each request an id, sent back as X-Request-Id, and
// writes one line once it is answered: status 499 if the client left before
// any answer, aborted=true if the answer was cut short.
func (s *server) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		w.Header().Set("X-Request-Id", s.requestID(r))
		rec := &statusRecorder{ResponseWriter: w}
		aborted := true // unless next returns
		defer func() {
			status := rec.status
			switch {
			case status == 0 && r.Context().Err() != nil:
				status = 499
			case status == 0:
				status = http.StatusOK
			}
			// The mux sets the pattern it routed to, "" for none.
			attrs := s.requestAttrs(w, r, slog.String("pattern", r.Pattern), slog.Int("status", status),
				slog.Duration("duration", time.Since(start)))
			if aborted {
				attrs = append(attrs, slog.Bool("aborted", true))
			}
			s.logger.LogAttrs(r.Context(), slog.LevelInfo, "request", attrs...)
		}()
		next.ServeHTTP(rec, r)
		aborted = false
	})
}

// requestID returns r's X-Request-Id if it is sane, one value of 1 to
// maxRequestID visible ASCII characters, and otherwise makes one.
func (s *server) requestID(r *http.Request) string {
	if v := r.Header.Values("X-Request-Id"); len(v) == 1 && len(v[0]) <= maxRequestID &&
		v[0] != "" && strings.IndexFunc(v[0], func(c rune) bool { return c < '!' || c > '~' }) < 0 {
		return v[0]
	}
	return string(strconv.AppendUint([]byte(s.idPrefix), s.requests.Add(1), 10))
}

// requestAttrs are what every log line about r carries, then more. Each is
// bounded: a client chooses the method, the path and so the line's size.
func (s *server) requestAttrs(w http.ResponseWriter, r *http.Request, more ...slog.Attr) []slog.Attr {
	return append([]slog.Attr{slog.String("request_id", w.Header().Get("X-Request-Id")), slog.String("client", clientAddr(r, s.trustedProxies).String()),
		slog.String("method", truncate(r.Method, maxLogField)), slog.String("path", truncate(r.URL.Path, maxLogField))}, more...)
}

// log returns the logger for a line about r.
func (s *server) log(w http.ResponseWriter, r *http.Request) *slog.Logger {
	return slog.New(s.logger.Handler().WithAttrs(s.requestAttrs(w, r)))
}

// recoverPanics turns a handler's panic into a logged 500, or, once part
// of the answer is out and cannot be taken back, into a cut connection.
// It runs inside logRequests, whose statusRecorder knows which.
func (s *server) recoverPanics(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v != http.ErrAbortHandler {
				s.log(w, r).Error("panic", "pattern", r.Pattern, "panic", v, "stack", string(debug.Stack()))
				if rec, ok := w.(*statusRecorder); ok && rec.status == 0 {
					writeError(w, http.StatusInternalServerError, "Internal server error")
					return
				}
			}
			panic(http.ErrAbortHandler)
		}()
		next.ServeHTTP(w, r)
	})
}

// closeUnreadBodies closes the connection after answering a request whose
// body was left unread. net/http would first wait for it (up to 256 KiB),
// to keep the connection: a client that declares a body and never sends it
// would hold its connection, and a MAX_CLIENTS place, for the ReadTimeout.
// With the read deadline past, net/http gives up at once.
func closeUnreadBodies(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength == 0 {
			next.ServeHTTP(w, r)
			return
		}
		body := &bodyReader{ReadCloser: r.Body}
		r.Body = body
		next.ServeHTTP(w, r)
		if !body.eof {
			http.NewResponseController(w).SetReadDeadline(time.Now())
		}
	})
}

// secureHeaders keeps answers out of caches and browsers from sniffing
// their type.
func secureHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		next.ServeHTTP(w, r)
	})
}

// requireLoopbackHost answers 421 to a request whose Host is not a loopback
// name: set when the service listens on loopback without a token, it keeps
// out web pages that reach it through a name of their own (DNS rebinding).
func requireLoopbackHost(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isLoopbackHost(r.Host) {
			writeError(w, http.StatusMisdirectedRequest, "Misdirected request")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// refuseUncleanPaths answers 404 to a path that is not clean (//users,
// /users/./1), which the mux would answer with an HTML redirect, followed by
// clients for a POST as a GET without its body. No route has such a path.
// Both forms: /users/%2F is clean as sent, but routes as /users//.
func refuseUncleanPaths(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isCleanPath(r.URL.EscapedPath()) || !isCleanPath(r.URL.Path) {
			writeError(w, http.StatusNotFound, "Not Found")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// jsonErrors gives the plain-text error answers of net/http (the mux's 404
// and 405) a JSON body, {"detail": "<status text>"}, keeping their status
// and headers.
func jsonErrors(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(&jsonErrorWriter{ResponseWriter: w}, r)
	})
}

type jsonErrorWriter struct {
	http.ResponseWriter
	replaced bool // whether a plain-text error body is being dropped
}

func (w *jsonErrorWriter) WriteHeader(status int) {
	if status >= 400 && strings.HasPrefix(w.Header().Get("Content-Type"), "text/plain") {
		writeError(w.ResponseWriter, status, http.StatusText(status))
		w.replaced = true
		return
	}
	w.ResponseWriter.WriteHeader(status)
}

func (w *jsonErrorWriter) Write(b []byte) (int, error) {
	if w.replaced {
		return len(b), nil
	}
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection's writer, to
// flush it or set its deadlines.
func (w *jsonErrorWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

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

// onlyPost answers 405 to any method but POST on path, which the mux
// would otherwise route to /users/{id}, or answer with its methods.
func onlyPost(path string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == path && r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			writeError(w, http.StatusMethodNotAllowed, "Method Not Allowed")
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

// statusRecorder remembers the status of the response it writes.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (rec *statusRecorder) WriteHeader(status int) {
	if rec.status == 0 {
		rec.status = status
	}
	rec.ResponseWriter.WriteHeader(status)
}

func (rec *statusRecorder) Write(b []byte) (int, error) {
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	return rec.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (rec *statusRecorder) Unwrap() http.ResponseWriter { return rec.ResponseWriter }

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

package main

import (
	"bytes"
	"cmp"
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

// This file is the HTTP surface: routes, handlers, reading and validating
// input, writing answers; and last the middleware, the service's armor.

// Limits on what clients send, and on what the service sends back.
const (
	maxBodyBytes     = 1 << 20  // a request body
	maxNameChars     = 128      // first_name and last_name, in characters
	maxEmailBytes    = 254      // an address, per RFC 5321's path limit
	minPasswordChars = 8        // NIST SP 800-63B's floor
	maxPageSize      = 1000     // ?limit=
	maxErrorEntries  = 20       // problems an error body lists
	maxErrorName     = 64       // bytes an error body keeps of a name the client chose
	maxLogField      = 200      // bytes a log line keeps of a method or a path
	maxRequestID     = 128      // the longest X-Request-Id taken from a client
	listBatchSize    = 1000     // users per query of a whole-table list
	listChunk        = 16 << 10 // bytes per write of a list, each given streamStall
	retryAfter       = "1"      // seconds, in every 503 and a 429 for the hashing share
)

type server struct {
	logger   *slog.Logger
	store    *store
	hasher   *hasher
	apiToken string
	serverOptions
	streams  chan struct{} // a slot for each whole-table list stream
	idPrefix string        // request ids the service makes are idPrefix and a count
	requests atomic.Uint64
	batches  sync.Pool // *bytes.Buffer: a list stream's batch, kept for the next
}

// serverOptions are newServer's settings besides the API token.
type serverOptions struct {
	maxStreams        int            // whole-table list streams served at once
	streamStall       time.Duration  // how long a list stream waits for its client to take a chunk
	loopbackHostsOnly bool           // answer only a loopback Host: on loopback without a token
	trustedProxies    []netip.Prefix // peers whose X-Forwarded-For names the client
}

type route struct {
	method, pattern string
	handler         http.HandlerFunc
	public          bool // served without the API token
}

// routes is the whole API surface. /users and /users/ are both served: a
// subtree pattern would redirect /users.
func (s *server) routes() []route {
	return []route{
		{"GET", "/healthz", s.health, true},
		{"GET", "/openapi.json", serve("application/json", openAPI), true},
		{"GET", "/docs", serve("text/html; charset=utf-8", []byte(docsPage)), true},
		{"POST", "/users", s.createUser, false},
		{"POST", "/users/{$}", s.createUser, false},
		{"GET", "/users", s.listUsers, false},
		{"GET", "/users/{$}", s.listUsers, false},
		{"GET", "/users/{id}", withUserID(s.getUser), false},
		{"PUT", "/users/{id}", withUserID(s.updateUser), false},
		{"DELETE", "/users/{id}", withUserID(s.deleteUser), false},
		{"POST", "/users/authenticate", s.authenticate, false},
	}
}

// newServer returns the service's HTTP handler. Every route but the public
// ones requires apiToken, if set; every POST and PUT body must be JSON.
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

// health answers whether the database answers, bounded by the store, not by
// the client: net/http ends a request's context on a client's half-close.
func (s *server) health(w http.ResponseWriter, r *http.Request) {
	if err := s.store.Ping(context.WithoutCancel(r.Context())); err != nil {
		s.log(w, r).Warn("health check failed", "err", err)
		writeUnavailable(w)
		return
	}
	encode(w, http.StatusOK, map[string]string{"status": "ok"})
}

// openAPI describes the API; the tests keep it true to the code.
//
//go:embed openapi.json
var openAPI []byte

// docsPage renders /openapi.json with Swagger UI from a CDN, pinned to one
// release and its SHA-384 hashes (.ci/run checks them); without it, a link.
const docsPage = `<!doctype html>
<html lang="en">
<meta charset="utf-8">
<title>users API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui.css" integrity="sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I" crossorigin="anonymous">
<div id="swagger-ui"><h1>users API</h1><p>Swagger UI, from cdn.jsdelivr.net, shows the API's description here.
Without it, read the description itself: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).</p></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui-bundle.js" integrity="sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9" crossorigin="anonymous"></script>
<script>if (window.SwaggerUIBundle) SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
`

func serve(contentType string, body []byte) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		w.Write(body)
	}
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
	u, err := s.store.CreateUser(r.Context(), newUser{FirstName: *in.FirstName, LastName: *in.LastName, Email: *in.Email, Password: hash})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/users/"+strconv.FormatInt(u.ID, 10))
	w.Header().Set("ETag", etag(u.Version))
	encode(w, http.StatusCreated, u)
}

func (s *server) getUser(w http.ResponseWriter, r *http.Request, id int64) {
	u, err := s.store.User(r.Context(), id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("ETag", etag(u.Version))
	// If-None-Match compares weakly: W/"1" matches "1".
	versions, star := tagVersions(r.Header.Values("If-None-Match"), true)
	if star || slices.Contains(versions, u.Version) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	encode(w, http.StatusOK, u)
}

func (s *server) updateUser(w http.ResponseWriter, r *http.Request, id int64) {
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
		// The password is checked against the user as changed, before commit.
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
	w.Header().Set("ETag", etag(u.Version))
	encode(w, http.StatusOK, u)
}

func (s *server) deleteUser(w http.ResponseWriter, r *http.Request, id int64) {
	versions, _ := tagVersions(r.Header.Values("If-Match"), false)
	if err := s.store.DeleteUser(r.Context(), id, versions); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// listUsers answers a look-up by ?email= (a list of one user, or 404), one
// page if ?limit= is given (with a Link to the next if it is full), and
// otherwise every user (after ?after_id=, if given).
func (s *server) listUsers(w http.ResponseWriter, r *http.Request) {
	q, problems := parseListQuery(r.URL.RawQuery)
	var page []user
	var err error
	switch {
	case len(problems) > 0:
		writeInvalid(w, problems)
		return
	case q.email != "":
		if !s.nfc(w, r, &q.email) {
			return
		}
		var u user
		u, err = s.store.UserByEmail(r.Context(), q.email)
		page = []user{u}
	case q.limit > 0:
		page, err = s.store.Users(r.Context(), q.afterID, q.limit)
	default:
		s.allUsers(w, r, q)
		return
	}
	switch {
	case errors.Is(err, errNotFound):
		writeError(w, http.StatusNotFound, "No users found")
	case err != nil:
		s.fail(w, r, err)
	default:
		if len(page) == q.limit {
			w.Header().Set("Link", fmt.Sprintf(`<%s?after_id=%d&limit=%d>; rel="next"`, r.URL.Path, page[len(page)-1].ID, q.limit))
		}
		encode(w, http.StatusOK, page)
	}
}

// allUsers streams every user after q.afterID as one JSON array, a batch per
// query, each read before it is sent; a stream holds one of s.streams. Once
// the 200 is out, a failure can only cut the stream short. HEAD reads one user.
func (s *server) allUsers(w http.ResponseWriter, r *http.Request, q listQuery) {
	select {
	case s.streams <- struct{}{}:
		defer func() { <-s.streams }()
	default:
		s.log(w, r).Warn("list users: every stream slot is taken", "max_streams", s.maxStreams)
		writeUnavailable(w)
		return
	}
	batch := listBatchSize
	if r.Method == http.MethodHead {
		batch = 0 // the one user read says whether there are any
	}
	buf := s.batches.Get().(*bytes.Buffer)
	defer s.batches.Put(buf)
	enc := json.NewEncoder(buf)
	sent, afterID := 0, q.afterID
	// readBatch encodes the next batch into buf; one user more says if more follow.
	readBatch := func() (more bool, err error) {
		buf.Reset()
		n := 0
		err = s.store.EachUser(r.Context(), afterID, batch+1, func(u *user) {
			if n++; n > batch {
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
	cut := func(level slog.Level, msg string, err error) {
		s.log(w, r).Log(r.Context(), level, msg, "err", err)
		panic(http.ErrAbortHandler)
	}

	more, err := readBatch()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if sent == 0 && !more && !q.given {
		writeError(w, http.StatusNotFound, "No users found")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	rc := http.NewResponseController(w)
	io.WriteString(w, "[")
	for {
		if !more {
			buf.WriteString("]\n")
		}
		for b := buf.Bytes(); len(b) > 0; b = b[min(len(b), listChunk):] {
			rc.SetWriteDeadline(time.Now().Add(s.streamStall))
			if _, err := w.Write(b[:min(len(b), listChunk)]); err != nil {
				cut(slog.LevelInfo, "list users: client stopped reading", err)
			}
		}
		if !more {
			return
		}
		// Send what is buffered before the next query.
		if err := rc.Flush(); err != nil {
			cut(slog.LevelInfo, "list users: client stopped reading", err)
		}
		if more, err = readBatch(); err != nil && r.Context().Err() == nil {
			cut(slog.LevelError, "list users: read next batch", err)
		} else if err != nil {
			panic(http.ErrAbortHandler) // the client left
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

// parseListQuery parses the query string of GET /users and reports what is wrong with it, by parameter.
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

// withUserID passes the user id in r's path to h; if there is none, it answers 404.
func withUserID(h func(http.ResponseWriter, *http.Request, int64)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, ok := parseNumber(r.PathValue("id"))
		if !ok || id == 0 {
			writeError(w, http.StatusNotFound, "User not found")
			return
		}
		h(w, r, id)
	}
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

// userInput is the body of a create or an update; nil is absent or null.
type userInput struct {
	FirstName, LastName, Email, Password *string
}

// readUserInput reads the body of a create or an update; like decode.
func readUserInput(w http.ResponseWriter, r *http.Request, create bool) (userInput, bool) {
	var in userInput
	fields := map[string]**string{"first_name": &in.FirstName, "last_name": &in.LastName, "email": &in.Email, "password": &in.Password}
	ok := decode(w, r, fields, func() map[string]string { return in.validate(create) })
	return in, ok
}

// credentials is the body of POST /users/authenticate, the email normalized.
type credentials struct{ email, password string }

// readCredentials reads the body of POST /users/authenticate, like decode:
// both fields required, the password of any length.
func readCredentials(w http.ResponseWriter, r *http.Request) (credentials, bool) {
	var in userInput
	ok := decode(w, r, map[string]**string{"email": &in.Email, "password": &in.Password}, func() map[string]string {
		problems := make(map[string]string)
		check(problems, "email", &in.Email, true, cleanEmail)
		check(problems, "password", &in.Password, true, nil)
		return problems
	})
	if !ok {
		return credentials{}, false
	}
	return credentials{*in.Email, *in.Password}, true
}

// decode reads the body, one JSON object in UTF-8 of at most maxBodyBytes,
// into fields: each member one of them, named once and exactly, with a
// string or null value; then it calls validate. If anything is wrong it
// answers the request and returns false.
func decode(w http.ResponseWriter, r *http.Request, fields map[string]**string, validate func() map[string]string) bool {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, "Request body too large")
		return false
	case err != nil:
		writeInvalid(w, map[string]string{"body": "could not be read"})
		return false
	case !utf8.Valid(body): // encoding/json would quietly make it U+FFFD
		writeInvalid(w, map[string]string{"body": "must be valid UTF-8"})
		return false
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
		return false
	}
	all := validate()
	maps.Copy(all, problems) // a member's own problem comes first
	if len(all) > 0 {
		writeInvalid(w, all)
		return false
	}
	return true
}

// validate normalizes the fields that are set and reports what is wrong
// with them. On create every field is required.
func (in *userInput) validate(create bool) map[string]string {
	problems := make(map[string]string)
	check(problems, "first_name", &in.FirstName, create, cleanName)
	check(problems, "last_name", &in.LastName, create, cleanName)
	check(problems, "email", &in.Email, create, cleanEmail)
	check(problems, "password", &in.Password, create, checkPassword)
	if problems["password"] == "" && in.Password != nil && closeToAccount(*in.Password, in.FirstName, in.LastName, in.Email) {
		problems["password"] = closeToAccountProblem
	}
	return problems
}

// check replaces *field, if set, with its cleaned value (clean nil: as is)
// and notes its problem; if it is not set and required, that is its problem.
func check(problems map[string]string, name string, field **string, required bool, clean func(string) (string, string)) {
	switch {
	case *field == nil && required:
		problems[name] = "required"
	case *field != nil && clean != nil:
		cleaned, problem := clean(**field)
		if problem != "" {
			problems[name] = problem
		}
		*field = &cleaned
	}
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
	case strings.ContainsRune(s, utf8.RuneError): // from an unpaired surrogate escape
		return s, "must be valid Unicode text"
	case strings.IndexFunc(s, isVisible) < 0:
		return s, "must contain a visible character"
	}
	return s, ""
}

// isVisible reports whether r shows as something of its own.
func isVisible(r rune) bool {
	return unicode.IsGraphic(r) && !unicode.IsSpace(r) && !unicode.IsMark(r) && !isInvisible(r)
}

// isInvisible reports whether r is a default-ignorable code point (U+200B,
// U+FEFF, variation selectors...) or the blank Braille pattern.
func isInvisible(r rune) bool {
	return r == '\u2800' || unicode.In(r, unicode.Cf, unicode.Variation_Selector, unicode.Other_Default_Ignorable_Code_Point)
}

// cleanEmail trims and lower-cases an address and reports what is wrong with it, if anything.
func cleanEmail(s string) (string, string) {
	s = strings.TrimSpace(s)
	lower := strings.ToLower(s) // which can take more bytes (Ⱥ, ⱥ)
	switch {
	case len(s) > maxEmailBytes || len(lower) > maxEmailBytes:
		return lower, fmt.Sprintf("must be at most %d bytes", maxEmailBytes)
	case !validEmail(lower):
		return lower, "must be a plain email address such as ann@example.com"
	}
	return lower, ""
}

// validEmail reports whether s is an address python-email-validator takes
// by default: a local part of at most 64 bytes, dot-separated atoms; a
// domain of at most 253 bytes, two or more labels of at most 63 bytes
// without an outer hyphen, the last not all digits. No quotes, comments or IP literals.
func validEmail(s string) bool {
	local, domain, ok := strings.Cut(s, "@")
	if !ok || len(local) > 64 || len(domain) > 253 {
		return false
	}
	for _, atom := range strings.Split(local, ".") {
		if !emailWord(atom, "!#$%&'*+/=?^_`{|}~") {
			return false
		}
	}
	labels := strings.Split(domain, ".")
	if len(labels) < 2 {
		return false
	}
	for _, label := range labels {
		if len(label) > 63 || !emailWord(label, "") || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
	}
	return strings.IndexFunc(labels[len(labels)-1], func(r rune) bool { return !unicode.IsDigit(r) }) >= 0
}

// emailWord reports whether s, an atom or a label, is not empty and holds
// only letters, digits, "-", the ASCII symbols given, and marks after the first.
func emailWord(s, symbols string) bool {
	for i, r := range s {
		switch {
		case isInvisible(r):
			return false
		case unicode.IsLetter(r), unicode.IsDigit(r), r == '-', strings.ContainsRune(symbols, r):
		case i == 0 || !unicode.IsMark(r):
			return false
		}
	}
	return s != ""
}

// checkPassword reports what is wrong with a password, if anything, with no
// composition rules, per NIST SP 800-63B.
func checkPassword(s string) (string, string) {
	switch {
	case strings.IndexFunc(s, unicode.IsControl) >= 0:
		return s, "must not contain control characters"
	case strings.ContainsRune(s, utf8.RuneError):
		return s, "must be valid Unicode text"
	case utf8.RuneCountInString(s) < minPasswordChars:
		return s, fmt.Sprintf("must be at least %d characters", minPasswordChars)
	case len(s) > maxPasswordBytes:
		return s, fmt.Sprintf("must be at most %d bytes", maxPasswordBytes)
	case strings.IndexFunc(s, isVisible) < 0 || commonPasswords[strings.ToLower(strings.TrimSpace(s))]:
		return s, "is too common: choose one that is harder to guess"
	}
	return s, ""
}

// commonPasswordsText: lower-case common passwords, a line each, after "#" lines.
//
//go:embed common-passwords.txt
var commonPasswordsText string

var commonPasswords = func() map[string]bool {
	set := make(map[string]bool, strings.Count(commonPasswordsText, "\n"))
	for line := range strings.Lines(commonPasswordsText) {
		if !strings.HasPrefix(line, "#") {
			set[strings.TrimSuffix(line, "\n")] = true
		}
	}
	return set
}()

// closeToAccountProblem is closeToAccount's problem; errCloseToAccount, on update.
const closeToAccountProblem = "is too close to the account's names or email: choose another"

var errCloseToAccount = errors.New("password too close to the account")

// closeToAccount reports whether password is, in any case, one of the
// account's words or what precedes an "@" in one. Nil is no word.
func closeToAccount(password string, words ...*string) bool {
	password = strings.TrimSpace(password)
	for _, w := range words {
		if w != nil && (strings.EqualFold(*w, password) || strings.EqualFold(strings.Split(*w, "@")[0], password)) {
			return true
		}
	}
	return false
}

// etag is the entity tag of a user's representation: its version, quoted.
func etag(version int64) string { return `"` + strconv.FormatInt(version, 10) + `"` }

// tagVersions reads an If-Match or If-None-Match header's lines: star if it
// is "*", otherwise the versions its tags name exactly (weak ones only if
// weak), nil if it is absent. A malformed tag names none.
func tagVersions(lines []string, weak bool) (versions []int64, star bool) {
	s := strings.Join(lines, ",")
	if len(lines) == 0 || strings.Trim(s, " \t") == "*" {
		return nil, len(lines) > 0
	}
	versions = []int64{}
	for _, tag := range strings.Split(s, ",") {
		tag, isWeak := strings.CutPrefix(strings.Trim(tag, " \t"), "W/")
		v, ok := parseNumber(strings.Trim(tag, `"`))
		if ok && tag == etag(v) && (weak || !isWeak) {
			versions = append(versions, v)
		}
	}
	return versions, false
}

// nfc puts *email, if not nil, in Unicode NFC, with PostgreSQL's help. If it
// fails, nfc answers the request itself and returns false.
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
		// The client left or closed its side: an empty answer would read as a
		// 200, so the connection is cut to say the work was not done.
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

// errorBody is every error response; Errors, for 400 Invalid data only,
// never repeats the rejected value.
type errorBody struct {
	Detail string            `json:"detail"`
	Errors map[string]string `json:"errors,omitempty"`
}

func writeError(w http.ResponseWriter, status int, detail string) {
	encode(w, status, errorBody{Detail: detail})
}

// writeUnavailable answers 503: retry after Retry-After seconds.
func writeUnavailable(w http.ResponseWriter) {
	w.Header().Set("Retry-After", retryAfter)
	writeError(w, http.StatusServiceUnavailable, "Service unavailable")
}

func writeInvalid(w http.ResponseWriter, problems map[string]string) {
	encode(w, http.StatusBadRequest, errorBody{Detail: "Invalid data", Errors: capProblems(problems)})
}

// capProblems keeps maxErrorEntries problems, known names first, each name
// cut to maxErrorName bytes and marked with an ellipsis.
func capProblems(problems map[string]string) map[string]string {
	names := slices.Sorted(maps.Keys(problems))
	kept := make(map[string]string)
	for _, unknown := range []bool{false, true} {
		for _, name := range names {
			if len(kept) == maxErrorEntries || strings.HasPrefix(problems[name], "unknown") != unknown {
				continue
			}
			if len(name) > maxErrorName {
				kept[truncate(name, maxErrorName)+"…"] = problems[name]
			} else {
				kept[name] = problems[name]
			}
		}
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

// wrap adds the middleware every request passes through. The log's recorder
// also gives the mux's plain-text 404 and 405 a JSON body.
func (s *server) wrap(mux http.Handler) http.Handler {
	h := refuseUncleanPaths(mux)
	if s.loopbackHostsOnly {
		h = requireLoopbackHost(h)
	}
	return s.logRequests(closeUnreadBodies(s.recoverPanics(secureHeaders(h))))
}

// logRequests gives each request an id, sent back as X-Request-Id, and logs
// one line once it is answered: 499 if the client left first, aborted=true
// if the answer was cut short.
func (s *server) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		w.Header().Set("X-Request-Id", s.requestID(r))
		rec := &recorder{ResponseWriter: w}
		aborted := true // unless next returns
		defer func() {
			status := cmp.Or(rec.status, http.StatusOK)
			if rec.status == 0 && r.Context().Err() != nil {
				status = 499
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

// requestID returns r's X-Request-Id if it is one value of 1 to maxRequestID
// visible ASCII characters, and otherwise makes one.
func (s *server) requestID(r *http.Request) string {
	if v := r.Header.Values("X-Request-Id"); len(v) == 1 && len(v[0]) <= maxRequestID &&
		v[0] != "" && strings.IndexFunc(v[0], func(c rune) bool { return c < '!' || c > '~' }) < 0 {
		return v[0]
	}
	return s.idPrefix + strconv.FormatUint(s.requests.Add(1), 10)
}

// requestAttrs are what every line about r carries, its id, client, method
// and path, each bounded; then more.
func (s *server) requestAttrs(w http.ResponseWriter, r *http.Request, more ...slog.Attr) []slog.Attr {
	return append([]slog.Attr{slog.String("request_id", w.Header().Get("X-Request-Id")),
		slog.String("client", clientAddr(r, s.trustedProxies).String()),
		slog.String("method", truncate(r.Method, maxLogField)), slog.String("path", truncate(r.URL.Path, maxLogField))}, more...)
}

// log returns the logger for a line about r. The access line, on every
// request, takes requestAttrs directly: a logger of its own costs more.
func (s *server) log(w http.ResponseWriter, r *http.Request) *slog.Logger {
	return slog.New(s.logger.Handler().WithAttrs(s.requestAttrs(w, r)))
}

// recoverPanics turns a handler's panic into a logged 500 or, once part of
// the answer is out (logRequests's recorder knows), a cut connection.
func (s *server) recoverPanics(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v != http.ErrAbortHandler {
				s.log(w, r).Error("panic", "pattern", r.Pattern, "panic", v, "stack", string(debug.Stack()))
				if rec, ok := w.(*recorder); ok && rec.status == 0 {
					writeError(w, http.StatusInternalServerError, "Internal server error")
					return
				}
			}
			panic(http.ErrAbortHandler)
		}()
		next.ServeHTTP(w, r)
	})
}

// closeUnreadBodies closes the connection after a request whose body was left
// unread, which net/http would otherwise wait for.
func closeUnreadBodies(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body := &bodyReader{ReadCloser: r.Body, eof: r.ContentLength == 0}
		r.Body = body
		next.ServeHTTP(w, r)
		if !body.eof {
			http.NewResponseController(w).SetReadDeadline(time.Now()) // net/http gives up at once
		}
	})
}

// secureHeaders keeps answers out of caches and from type sniffing.
func secureHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		next.ServeHTTP(w, r)
	})
}

// refuse answers status and detail, with header, to a request bad reports
// on, and passes the others to next.
func refuse(next http.Handler, bad func(*http.Request) bool, status int, detail string, header map[string]string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !bad(r) {
			next.ServeHTTP(w, r)
			return
		}
		for k, v := range header {
			w.Header().Set(k, v)
		}
		writeError(w, status, detail)
	})
}

// requireLoopbackHost answers 421 to a Host that is not a loopback name, against DNS rebinding.
func requireLoopbackHost(next http.Handler) http.Handler {
	notLoopback := func(r *http.Request) bool { return !isLoopbackHost(r.Host) }
	return refuse(next, notLoopback, http.StatusMisdirectedRequest, "Misdirected request", nil)
}

// refuseUncleanPaths answers 404 to a path the mux would redirect (//users,
// /users/./1), as sent or as routed (/users/%2F routes as /users//).
func refuseUncleanPaths(next http.Handler) http.Handler {
	unclean := func(r *http.Request) bool { return !isCleanPath(r.URL.EscapedPath()) || !isCleanPath(r.URL.Path) }
	return refuse(next, unclean, http.StatusNotFound, "Not Found", nil)
}

// requireToken lets a request through only with the API token as a bearer
// token; digests compared in constant time leak neither bytes nor length.
func (s *server) requireToken(next http.Handler) http.Handler {
	want := sha256.Sum256([]byte(s.apiToken))
	noToken := func(r *http.Request) bool {
		scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		got := sha256.Sum256([]byte(token))
		return !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare(got[:], want[:]) != 1
	}
	return refuse(next, noToken, http.StatusUnauthorized, "Not authenticated",
		map[string]string{"WWW-Authenticate": "Bearer", "Connection": "close"})
}

// onlyPost answers 405 to any method but POST on path, which the mux would
// otherwise route to /users/{id}.
func onlyPost(path string, next http.Handler) http.Handler {
	notPost := func(r *http.Request) bool { return r.URL.Path == path && r.Method != http.MethodPost }
	return refuse(next, notPost, http.StatusMethodNotAllowed, "Method Not Allowed", map[string]string{"Allow": http.MethodPost})
}

// requireJSON answers 415 to a body not labelled JSON, a label no web page
// can send to another site without a CORS preflight.
func requireJSON(next http.Handler) http.Handler {
	notJSON := func(r *http.Request) bool { return !isJSONType(r.Header.Values("Content-Type")) }
	return refuse(next, notJSON, http.StatusUnsupportedMediaType, "Unsupported media type", nil)
}

// isJSONType reports whether the Content-Type lines are one application/json,
// in any case, with no charset but UTF-8. Lines join as a list, which is not one type.
func isJSONType(lines []string) bool {
	mediaType, params, err := mime.ParseMediaType(strings.Join(lines, ","))
	charset, ok := params["charset"]
	return err == nil && mediaType == "application/json" && (!ok || strings.EqualFold(charset, "utf-8"))
}

// isCleanPath reports whether p is rooted, with no empty, "." or ".."
// segment (a final slash aside): the mux serves it without a redirect.
func isCleanPath(p string) bool {
	clean := path.Clean(p)
	if strings.HasSuffix(p, "/") && clean != "/" {
		clean += "/"
	}
	return strings.HasPrefix(p, "/") && clean == p
}

// isLoopbackHost reports whether host, a request's Host, names a loopback
// host: localhost, an address in 127.0.0.0/8 or [::1], with any port.
func isLoopbackHost(host string) bool {
	if i := strings.LastIndexByte(host, ':'); i > strings.LastIndexByte(host, ']') {
		if strings.Trim(host[i+1:], "0123456789") != "" {
			return false
		}
		host = host[:i]
	}
	inner, bracketed := strings.CutPrefix(host, "[")
	inner, closed := strings.CutSuffix(inner, "]")
	addr, err := netip.ParseAddr(inner)
	return strings.EqualFold(host, "localhost") ||
		err == nil && bracketed == closed && addr.Is6() == bracketed && addr.Zone() == "" && addr.IsLoopback()
}

// recorder remembers the status of the answer it writes, and gives
// net/http's plain-text errors a JSON body, keeping status and headers.
type recorder struct {
	http.ResponseWriter
	status   int
	replaced bool // whether a plain-text error body is being dropped
}

func (rec *recorder) WriteHeader(status int) {
	rec.status = cmp.Or(rec.status, status)
	if status >= 400 && strings.HasPrefix(rec.Header().Get("Content-Type"), "text/plain") {
		writeError(rec.ResponseWriter, status, http.StatusText(status))
		rec.replaced = true
		return
	}
	rec.ResponseWriter.WriteHeader(status)
}

func (rec *recorder) Write(b []byte) (int, error) {
	rec.status = cmp.Or(rec.status, http.StatusOK)
	if rec.replaced {
		return len(b), nil
	}
	return rec.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (rec *recorder) Unwrap() http.ResponseWriter { return rec.ResponseWriter }

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

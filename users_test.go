package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// Tests of users.go, and of openapi.json kept true to it. Validation rules
// are tested as pure functions; the HTTP tests check what only a whole
// request can show.

// userJSON is a user as the API sends it.
type userJSON struct {
	ID        int64  `json:"id"`
	FirstName string `json:"first_name"`
	LastName  string `json:"last_name"`
	Email     string `json:"email"`
	CreatedAt string `json:"created_at"`
	UpdatedAt string `json:"updated_at"`
}

// userBody returns a create body.
func userBody(first, last, email, password string) string {
	b, _ := json.Marshal(map[string]string{"first_name": first, "last_name": last, "email": email, "password": password})
	return string(b)
}

// mustJSON checks that r is status with a JSON body that decodes into v,
// with no field v lacks.
func mustJSON(t *testing.T, r response, status int, v any) {
	t.Helper()
	if r.status != status {
		t.Fatalf("%s, want %d", r, status)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type = %q, want application/json", r.what, ct)
	}
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: body %.200s: %v", r.what, r.body, err)
	}
}

func mustUser(t *testing.T, r response, status int) userJSON {
	t.Helper()
	var u userJSON
	mustJSON(t, r, status, &u)
	return u
}

// mustList checks that r is 200 with a JSON array of users, and returns it.
func mustList(t *testing.T, r response) []userJSON {
	t.Helper()
	var users []userJSON
	mustJSON(t, r, http.StatusOK, &users)
	if users == nil {
		t.Fatalf("%s: body %s, want an array", r.what, r.body)
	}
	return users
}

// mustError checks that r is status with {"detail": detail}, and returns the
// error body.
func mustError(t *testing.T, r response, status int, detail string) errorBody {
	t.Helper()
	var e errorBody
	mustJSON(t, r, status, &e)
	if e.Detail != detail {
		t.Fatalf("%s: detail = %q, want %q", r.what, e.Detail, detail)
	}
	return e
}

func (e *testEnv) createUser(t *testing.T, first, last, email, password string) userJSON {
	t.Helper()
	return mustUser(t, e.do("POST", "/users/", userBody(first, last, email, password)), http.StatusCreated)
}

// storedSecret reads the password hash and salt stored for a user.
func (e *testEnv) storedSecret(t *testing.T, id int64) (hash, salt string) {
	t.Helper()
	if err := e.store.db.QueryRow(`SELECT password, salt FROM users WHERE id = $1`, id).Scan(&hash, &salt); err != nil {
		t.Fatalf("read stored password of user %d: %v", id, err)
	}
	return hash, salt
}

func countUsers(t *testing.T, st *store) int { t.Helper(); return countRows(t, st, "users") }

// countRows counts the rows of a table: sign_in_failures has one for each
// failure counted.
func countRows(t *testing.T, st *store, table string) int {
	t.Helper()
	var n int
	if err := st.db.QueryRow(`SELECT count(*) FROM ` + table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// seedUsers inserts n users straight into the table, without bcrypt.
func seedUsers(t testing.TB, st *store, n int) {
	t.Helper()
	_, err := st.db.Exec(`
		INSERT INTO users (first_name, last_name, email, password, salt)
		SELECT 'First' || i, 'Last' || i, 'user' || i || '@example.com', 'x', 'x'
		FROM generate_series(1, $1) AS i`, n)
	if err != nil {
		t.Fatalf("seed %d users: %v", n, err)
	}
}

// parseTimestamp parses a timestamp as the API writes it: RFC 3339 in UTC,
// fractional seconds only as far as PostgreSQL keeps them.
func parseTimestamp(t *testing.T, s string) time.Time {
	t.Helper()
	ts, err := time.Parse(time.RFC3339Nano, s)
	if err != nil || !regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$`).MatchString(s) {
		t.Fatalf("timestamp %q is not RFC 3339 in UTC (%v)", s, err)
	}
	return ts
}

// Validation rules, as pure functions.

// Names the service takes, and names it refuses.
var (
	goodNames = []string{
		"A", strings.Repeat("é", 128), "  " + strings.Repeat("a", 128) + "  ", // 128 characters, trimmed
		"O'Brien-Smith de la Cruz", "李小龍", "שָׁלוֹם", "Łukasz ابن O'Neil-Ñúñez", "👩‍💻",
		"\u202eeciffo", "Le\u200be", // a right-to-left override and a zero-width space are text
		"می\u200cخواهم", "क्\u200dष", // joiners, as Persian and Indic names use
		`Robert'); DROP TABLE users;--`, `"Ann" \ 'Lee' \n`,
	}
	badNames = []string{
		strings.Repeat("é", 129), " " + strings.Repeat("a", 129) + " ", strings.Repeat("a", 10000),
		"", "   ", "Ann\nLee", "Ann\tLee", "Lee\x00",
		"Ann\uFFFD", // what encoding/json makes of an unpaired surrogate
	}
)

// Addresses the service takes, and addresses it refuses: as
// python-email-validator does by default.
var goodEmails, badEmails = func() (good, bad []string) {
	label63 := strings.Repeat("b", 63)
	domain253 := label63 + "." + label63 + "." + label63 + "." + strings.Repeat("c", 61)
	// 254 bytes within the part limits: a local part of 64, labels of 63.
	label57 := strings.Repeat("d", 57)
	email254 := strings.Repeat("a", 64) + "@" + label63 + "." + strings.Repeat("c", 63) + "." + label57 + ".com"
	good = []string{
		"ann@example.com", " Ann.Lee@Example.COM\t", "o'brien+tag@mail.example.co.uk", "o'brien--@example.com",
		"jürgen@bücher.example", "zoë@example.com", "a@xn--bcher-kva.example",
		"ju\u0308rgen@bu\u0308cher.example", "अनु@उदाहरण.भारत", // combining marks
		"!#$%&'*+/=?^_`{|}~-@example.com", "a.b.c@example.com", "a@123.example", "a@ex-am-ple.c0m",
		strings.Repeat("a", 64) + "@example.com", "a@" + label63 + ".com", "a@" + domain253[1:], email254,
	}
	bad = []string{
		strings.Replace(email254, label57, label57+"d", 1), "a@" + domain253, // 255 bytes
		strings.Replace(email254, "dd", "Ⱥ", 1), // 254 bytes that grow in lower case
		strings.Repeat("a", 10000) + "@example.com", strings.Repeat("a", 65) + "@example.com",
		"a@" + strings.Repeat("b", 64) + ".com", "a@c" + domain253,
		"a@ex!ample.com", "a@exa{m}ple.com", "a@ex_ample.com", "a@-example.com", "a@example-.com", "a@example.١٢",
		"a@b", "a..b@example.com", ".a@example.com", "a.@example.com", `"q"@example.com`, "a(comment)@example.com",
		"a@[127.0.0.1]", "a@127.0.0.1", "a@example.com.", "a@example..com", "@example.com", "a@", "ann.example.com",
		"a@b@example.com", "a b@example.com", "Ann <ann@example.com>", "<ann@example.com>", "ann@example.com, bob@example.com",
		"a\u200b@example.com", "a\u202e@example.com", "a\x00@example.com", "a@exam\u00adple.com", // invisible or control
		"a\ufeff@example.com", "a\u200d@example.com", "a\u2060@example.com", "a\U000e0041@example.com",
		"a\u034f@example.com", "a\ufe0f@example.com", "a\U000e0100@example.com", "a\u3164@example.com", "a@ex\u115fample.com",
		"a\u200c@example.com", "a\u200e@example.com", "a\u00a0@example.com", "a@ex\u180eample.com", "a@\u2800example.com",
		"\u0308a@example.com", "a@\u0308example.com", // a mark with nothing to mark
		"😀@example.com", "a\xff@example.com", "",
	}
	return good, bad
}()

// TestRules checks each rule on values it takes, cleaned as wanted, and
// values it refuses, with a problem that does not repeat the value.
func TestRules(t *testing.T) {
	t.Parallel()
	rule := func(ok func(string) bool) func(string) (string, string) {
		return func(s string) (string, string) { return s, map[bool]string{false: "refused"}[ok(s)] }
	}
	same := func(s string) string { return s }
	for _, tt := range []struct {
		name      string
		clean     func(string) (string, string)
		want      func(string) string // what a good value is cleaned to
		good, bad []string
	}{
		{"cleanName", cleanName, strings.TrimSpace, goodNames,
			// Names with nothing visible; openapi.json's pattern cannot tell them.
			append(badNames, "\ufeff", "\u200b", "\u200c\u200d", " \u3164 ", "\ufe0f", "\u2800\u00ad", "\u0301", "\u20dd", "\u3000\u0301")},
		{"cleanEmail", cleanEmail, func(s string) string { return strings.ToLower(strings.TrimSpace(s)) }, goodEmails, badEmails},
		{"checkPassword", checkPassword, same, []string{
			"1234567x", strings.Repeat("p", 72), "   x    ", // 8 characters to 72 bytes, any of them
			strings.Repeat("€", 24),                                                               // 24 characters in 72 bytes
			"correct horse battery", "Tr0ub4dor&3-zq", "pässwörd 李", "password 1", "qwertyuiop[]", // strong, or not listed
		}, []string{
			"1234567", strings.Repeat("é", 7), // 7 characters, in 14 bytes
			strings.Repeat("p", 73), strings.Repeat("€", 25), strings.Repeat("a", 10000),
			"pass\u0001word", "pass\x00word", "passwo\uFFFDrd1",
			"PassWord1", "ILOVEYOU", "qwertyuiop", "1q2w3e4r5t", " password123 ", // common, in any case
			"        ", strings.Repeat("\u3000", 8), strings.Repeat("\u200b", 8), // nothing visible
		}},
		{"isLoopbackHost", rule(isLoopbackHost), same, []string{
			"localhost", "localhost:8000", "LocalHost:1", "localhost:", "127.0.0.1", "127.0.0.1:8000",
			"127.255.0.9:80", "[::1]", "[::1]:8000", "[0:0:0:0:0:0:0:1]:8000",
		}, []string{
			"", "evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io:8000",
			"localhost.", "0.0.0.0:8000", "10.0.0.1", "128.0.0.1", "::1", "[::1]x", "[fe80::1%lo]:80", "127.1", "2130706433",
			"localhost:80x", "localhost:-1", "127.0.0.1:8000:80", "[127.0.0.1]:80", "[localhost]", "[::1", "::1]",
		}},
		{"isCleanPath", rule(isCleanPath), same,
			[]string{"/", "/users", "/users/", "/users/1", "/users/%2F1"},
			[]string{"", "users", "//", "//users", "/users//", "/users/./1", "/users/../1", "/users/.", "/users/..", "/users/1/./"}},
		{"isJSONType (lines joined by \\n)", rule(func(s string) bool { return isJSONType(strings.Split(s, "\n")) }), same, []string{
			"application/json", "application/json; charset=utf-8", `Application/JSON; Charset="UTF-8"`, "application/json ; foo=bar",
		}, []string{
			"", "text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
			"multipart/form-data; boundary=x", "text/json", "application/jsonx", "application/json-patch+json",
			"application/json; charset=iso-8859-1", "application/json; charset", "application/json, text/plain",
			"application/json\napplication/json",
		}},
	} {
		for _, s := range tt.good {
			if got, problem := tt.clean(s); problem != "" || got != tt.want(s) {
				t.Errorf("%s(%.40q) = %q, %q; want %q, no problem", tt.name, s, got, problem, tt.want(s))
			}
		}
		for _, s := range tt.bad {
			// (The example address a problem gives ends in one of the values.)
			_, problem := tt.clean(s)
			if problem == "" || strings.TrimSpace(s) != "" && strings.Contains(problem, s) && !strings.HasSuffix("ann@example.com", s) {
				t.Errorf("%s(%.40q) problem %q, want one that does not repeat the value", tt.name, s, problem)
			}
		}
	}
	// Every entry of the list, and no comment line, is in the set.
	if len(commonPasswords) != 17950 || commonPasswords["# copyright (c) 2021 @zxcvbn-ts"] {
		t.Errorf("%d common passwords, want 17950 and no comment line", len(commonPasswords))
	}
	for password := range commonPasswords {
		if _, problem := checkPassword(strings.ToUpper(password)); !strings.Contains(problem, "too common") {
			t.Errorf("checkPassword(%q) = %q, want too common", strings.ToUpper(password), problem)
		}
	}
}

func TestPasswordCloseToAccount(t *testing.T) {
	t.Parallel()
	for password, refused := range map[string]bool{
		"Wilhelmina": true, " Wilhelmina ": true, "LEE-SMITHSON": true, "w.lee-smith@example.com": true, "W.Lee-Smith": true,
		"Wilhelmina!": false, "example.com": false, "w.lee-smith@example": false,
	} {
		for _, create := range []bool{true, false} {
			first, last, email := " Wilhelmina ", "Lee-Smithson", "W.Lee-Smith@Example.com"
			in := userInput{FirstName: &first, LastName: &last, Email: &email, Password: &password}
			if got := in.validate(create)["password"]; (got == closeToAccountProblem) != refused {
				t.Errorf("validate(%v) of password %q for %s %s %s: %q, refused want %v", create, password, first, last, email, got, refused)
			}
		}
	}
}
func TestTagVersions(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		lines        []string
		strong, weak []int64 // nil: none given, or "*"
		star         bool
	}{
		{nil, nil, nil, false},
		{[]string{" * "}, nil, nil, true},
		{[]string{`"1"`}, []int64{1}, []int64{1}, false},
		{[]string{`W/"1", "2",,"x"`, `"3" , W/"4"`}, []int64{2, 3}, []int64{1, 2, 3, 4}, false},
		{[]string{`"01", W/"0002", W/ "1", "1"x, "1" "2", "+1"`}, []int64{}, []int64{}, false},
		{[]string{`"a,b", "5"`}, []int64{5}, []int64{5}, false},
		{[]string{`"-1", "", "1`, `"`}, []int64{}, []int64{}, false},
		{[]string{"1, *"}, []int64{}, []int64{}, false},
	} {
		strong, star := tagVersions(tt.lines, false)
		weak, _ := tagVersions(tt.lines, true)
		if !slices.Equal(strong, tt.strong) || (strong == nil) != (tt.strong == nil) || !slices.Equal(weak, tt.weak) || star != tt.star {
			t.Errorf("tagVersions(%q) = %v, %v (weakly %v), want %v, %v (weakly %v)", tt.lines, strong, star, weak, tt.strong, tt.star, tt.weak)
		}
	}
}

func TestParseListQuery(t *testing.T) {
	t.Parallel()
	for query, want := range map[string]listQuery{
		"":                            {},
		"limit=10":                    {limit: 10, given: true},
		"limit=1000&after_id=0":       {limit: 1000, given: true},
		"after_id=7":                  {afterID: 7, given: true},
		"email=%20Ann@Example.com%20": {email: "ann@example.com", given: true},
		"email=ann%40example.com":     {email: "ann@example.com", given: true},
	} {
		if q, problems := parseListQuery(query); q != want || len(problems) > 0 {
			t.Errorf("parseListQuery(%q) = %+v, %v; want %+v", query, q, problems, want)
		}
	}
	// Each query, and the name its problems give.
	for query, name := range map[string]string{
		"limit=0": "limit", "limit=1001": "limit", "limit=-1": "limit", "limit=abc": "limit", "limit=": "limit",
		"limit=1.5": "limit", "limit=1&limit=2": "limit", "after_id=-1": "after_id", "after_id=x": "after_id",
		"after_id=99999999999999999999": "after_id", "page=2": "page", "limt=10": "limt",
		"limit=1;x": "query", "limit=%zz": "query", "email=a%": "query", // cannot be parsed at all
		"email=": "email", "email=not-an-email": "email", "email=Ann%20%3Cann@example.com%3E": "email",
		"email=ann@example.com&email=bob@example.com": "email", "email=ann@example.com&limit=10": "email",
		"email=ann@example.com&after_id=0": "email", "email=" + strings.Repeat("a", 250) + "@example.com": "email",
	} {
		if _, problems := parseListQuery(query); problems[name] == "" {
			t.Errorf("parseListQuery(%.60q) problems = %v, want one for %q", query, problems, name)
		}
	}
}

// TestReadBody checks the decoding of both kinds of body: each is taken, or
// refused with a 400 that names the field at fault.
func TestReadBody(t *testing.T) {
	t.Parallel()
	const ok = `{"first_name":"Bob","last_name":"Lee","email":"bob@example.com","password":"passw0rd-1"}`
	with := func(old, new string) string { return strings.Replace(ok, old, new, 1) }
	// read runs a reader on body as a request brings it, and returns the
	// errors of its 400, nil if it took the body and answered nothing.
	read := func(reader func(http.ResponseWriter, *http.Request) bool, body string) map[string]string {
		rec := httptest.NewRecorder()
		if reader(rec, httptest.NewRequest("POST", "/users/", strings.NewReader(body))) {
			if rec.Body.Len() > 0 {
				t.Fatalf("body %.80q was taken, but an answer was written: %s", body, rec.Body)
			}
			return nil
		}
		var e errorBody
		if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || rec.Code != http.StatusBadRequest || e.Detail != "Invalid data" || len(e.Errors) == 0 {
			t.Fatalf("read %.80q: %d %s, want 400 Invalid data with errors", body, rec.Code, rec.Body)
		}
		return e.Errors
	}
	create := func(w http.ResponseWriter, r *http.Request) bool { _, ok := readUserInput(w, r, true); return ok }
	update := func(w http.ResponseWriter, r *http.Request) bool { _, ok := readUserInput(w, r, false); return ok }
	var signIn credentials
	authenticate := func(w http.ResponseWriter, r *http.Request) (ok bool) { signIn, ok = readCredentials(w, r); return ok }
	readers := []func(http.ResponseWriter, *http.Request) bool{create, update, authenticate}
	for _, tt := range []struct {
		body, create, update, authenticate string // a field each refuses, "" if it takes the body
	}{
		{ok, "", "", "first_name"},
		{ok + strings.Repeat(" ", maxBodyBytes-len(ok)), "", "", "first_name"}, // exactly 1 MiB
		{"", "body", "body", "body"},
		{"first_name=Bob", "body", "body", "body"},
		{strings.TrimSuffix(ok, "}"), "body", "body", "body"},
		{ok + "{}", "body", "body", "body"},
		{ok + "x", "body", "body", "body"},
		{"[" + ok + "]", "body", "body", "body"},
		{"null", "body", "body", "body"},
		{with("Bob", "B\xffb"), "body", "body", "body"},
		{with("Bob", "Bob\xc0\x80"), "body", "body", "body"}, // overlong UTF-8 NUL
		{`{"First_Name":"Bob"}`, "First_Name", "First_Name", "First_Name"},
		{`{"id":7}`, "id", "id", "id"},
		{`{"first_name":1}`, "first_name", "first_name", "first_name"},
		{`{"first_name":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + "}", "first_name", "first_name", "first_name"},
		{`{"last_name":""}`, "last_name", "last_name", "last_name"},
		{`{"first_name":"Bob\ud800"}`, "first_name", "first_name", "first_name"}, // an unpaired surrogate
		{`{"password":"pass\u0000word"}`, "password", "password", "email"},
		{`{"email":"bob","password":"x"}`, "email", "email", "email"},
		{`{"email":"bob@example.com","password":null}`, "password", "", "password"},
		{`{"email":"bob@example.com","password":12345678}`, "password", "password", "password"},
		{`{"email":"bob@example.com"}`, "password", "", "password"},
		{`{"password":"x"}`, "password", "password", "email"},
		{`{"email":"bob@example.com","password":"x","remember":true}`, "remember", "remember", "remember"},
		{`{"email":"a@example.com","email":"bob@example.com"}`, "email", "email", "email"}, // encoding/json keeps the last, others the first
		{`{"email":"bob@example.com","password":"x","pass\u0077ord":"y"}`, "password", "password", "password"},
		{`{"last_name":"Lee","last_name":null}`, "last_name", "last_name", "last_name"},
	} {
		for i, want := range []string{tt.create, tt.update, tt.authenticate} {
			if errs := read(readers[i], tt.body); (errs == nil) != (want == "") || want != "" && errs[want] == "" {
				t.Errorf("reader %d of create, update, sign-in: read %.80q: errors %v, want one for %q", i, tt.body, errs, want)
			}
		}
	}
	// No length rule on the password: a wrong one of any length gets the
	// answer any wrong password gets. The email is normalized.
	if read(authenticate, `{"email":"  ANN@example.COM ","password":""}`) != nil || signIn != (credentials{"ann@example.com", ""}) {
		t.Errorf("credentials read as %+v, want the email trimmed and lower-cased, the empty password taken", signIn)
	}
	// At most maxErrorEntries problems, known fields' first, names cut.
	many := `{"email":"bad","` + strings.Repeat(`\u0001<`, 100) + `":1`
	for i := range 100 {
		many += fmt.Sprintf(`,"unknown-%04d":1`, i)
	}
	if errs := read(create, many+"}"); len(errs) != maxErrorEntries || errs["email"] == "" || errs["unknown-0000"] == "" ||
		errs[strings.Repeat("\x01<", maxErrorName/2)+"…"] == "" {
		t.Errorf("100 unknown fields: errors %q, want %d: email, unknown-0000 and the long name cut to %d bytes among them", errs, maxErrorEntries, maxErrorName)
	}
}

// The HTTP contract.

// TestErrorAnswers is the contract of every answer that refuses a request:
// its status, detail and the field it names, and that it changed nothing.
func TestErrorAnswers(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	ann := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	bob := e.createUser(t, "Bob", "Ray", "bob@example.com", "passw0rd-2")
	big := `{"first_name":"` + strings.Repeat("a", maxBodyBytes-16) + `"}` // a byte past 1 MiB
	newUser := userBody("Cy", "Day", "cy@example.com", "passw0rd-3")
	type row struct {
		name, method, path, body, header string
		status                           int
		detail                           string
		field                            string // the errors entry of a 400, the Allow of a 405
	}
	rows := []row{
		{"no route", "GET", "/nope", "", "", 404, "Not Found", ""},
		{"below a user", "GET", "/users/1/extra", "", "", 404, "Not Found", ""},
		// The mux would redirect these to their clean form, which a client
		// follows for a POST as a GET without its body, and in HTML.
		{"double slash, POST", "POST", "//users", newUser, "", 404, "Not Found", ""},
		{"escaped slash", "GET", "/users/%2F?limit=1", "", "", 404, "Not Found", ""},
		{"dot-dot segment, PUT", "PUT", "/users/../users/1", `{"first_name":"X"}`, "", 404, "Not Found", ""},
		{"PATCH a user", "PATCH", "/users/1", "", "", 405, "Method Not Allowed", "DELETE, GET, HEAD, PUT"},
		{"DELETE the collection", "DELETE", "/users/", "", "", 405, "Method Not Allowed", "GET, HEAD, POST"},
		{"POST healthz", "POST", "/healthz", "", "", 405, "Method Not Allowed", "GET, HEAD"},
		{"id not a number", "GET", "/users/abc", "", "", 404, "User not found", ""},
		{"id zero", "DELETE", "/users/0", "", "", 404, "User not found", ""},
		{"id with a sign", "PUT", "/users/+1", `{"first_name":"X"}`, "", 404, "User not found", ""},
		{"id past int64", "GET", "/users/9223372036854775808", "", "", 404, "User not found", ""},
		{"the largest id, nobody's", "GET", "/users/9223372036854775807", "", "", 404, "User not found", ""},
		{"PUT nobody", "PUT", "/users/3", `{"first_name":"X"}`, "", 404, "User not found", ""},
		{"DELETE nobody", "DELETE", "/users/3", "", "", 404, "User not found", ""},
		// Not /users/{id}'s methods: /users/authenticate is POST only.
		{"GET authenticate", "GET", "/users/authenticate", "", "", 405, "Method Not Allowed", "POST"},
		{"DELETE authenticate", "DELETE", "/users/authenticate", "", "", 405, "Method Not Allowed", "POST"},
		{"authenticate with a slash", "POST", "/users/authenticate/", authBody("ann@example.com", "passw0rd-1"), "", 404, "Not Found", ""},
		{"update, bad body", "PUT", "/users/1", "{", "", 400, "Invalid data", "body"},
		{"update to a taken email", "PUT", "/users/1", `{"email":"BOB@example.com"}`, "", 400, "Email already registered", ""},
		{"update to the stored email as password", "PUT", "/users/1", `{"password":"ANN@example.com"}`, "", 400, "Invalid data", "password"},
		{"update, stale If-Match", "PUT", "/users/1", `{"first_name":"X"}`, `If-Match: "2", "x"`, 412, "Precondition failed: the user has changed", ""},
		{"update, weak If-Match", "PUT", "/users/1", `{"first_name":"X"}`, `If-Match: W/"1"`, 412, "Precondition failed: the user has changed", ""},
		{"update nobody, If-Match *", "PUT", "/users/3", `{"first_name":"X"}`, "If-Match: *", 404, "User not found", ""},
		{"delete, stale If-Match", "DELETE", "/users/2", "", `If-Match: "7"`, 412, "Precondition failed: the user has changed", ""},
		{"update, body over 1 MiB", "PUT", "/users/1", big, "", 413, "Request body too large", ""},
		{"update, not JSON", "PUT", "/users/1", `{"first_name":"X"}`, "Content-Type: text/plain", 415, "Unsupported media type", ""},
		{"authenticate, bad email", "POST", "/users/authenticate", authBody("ann", "passw0rd-1"), "", 400, "Invalid data", "email"},
		{"authenticate, body over 1 MiB", "POST", "/users/authenticate", big, "", 413, "Request body too large", ""},
		{"authenticate, no Content-Type", "POST", "/users/authenticate", authBody("ann@example.com", "passw0rd-1"), "Content-Type:", 415, "Unsupported media type", ""},
	}
	// /users answers as /users/ does, errors too.
	for _, path := range []string{"/users", "/users/"} {
		rows = append(rows,
			row{"create without a field on " + path, "POST", path, `{"first_name":"Bob"}`, "", 400, "Invalid data", "last_name"},
			row{"create with a taken email in another case on " + path, "POST", path, userBody("Ann", "Lee", "ANN@example.com", "passw0rd-1"), "", 400, "Email already registered", ""},
			row{"create, body over 1 MiB, on " + path, "POST", path, big, "", 413, "Request body too large", ""},
			row{"create, not JSON, on " + path, "POST", path, newUser, "Content-Type: text/plain", 415, "Unsupported media type", ""},
			row{"list, bad limit, on " + path, "GET", path + "?limit=0", "", "", 400, "Invalid data", "limit"},
			row{"look-up of nobody on " + path, "GET", path + "?email=nobody@example.com", "", "", 404, "No users found", ""},
		)
	}
	for _, tt := range rows {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do(tt.method, tt.path, tt.body, tt.header)
			errs := mustError(t, r, tt.status, tt.detail).Errors
			switch {
			case tt.status == http.StatusMethodNotAllowed && r.header.Get("Allow") != tt.field:
				t.Errorf("%s: Allow = %q, want %q", r.what, r.header.Get("Allow"), tt.field)
			case tt.status == http.StatusBadRequest && tt.field != "" && errs[tt.field] == "":
				t.Errorf("%s: errors = %v, want an entry for %q", r.what, errs, tt.field)
			case tt.status != http.StatusBadRequest && errs != nil:
				t.Errorf("%s: errors = %v on a %d", r.what, errs, tt.status)
			}
		})
	}
	// An error status means nothing changed.
	if n := countUsers(t, e.store); n != 2 {
		t.Errorf("%d users stored after refused requests, want 2", n)
	}
	for _, u := range []userJSON{ann, bob} {
		if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
			t.Errorf("user after refused requests = %+v, want %+v", got, u)
		}
	}
	if n := countRows(t, e.store, "sign_in_failures"); n != 0 {
		t.Errorf("refused sign-ins counted failures for %d addresses, want none", n)
	}
}

func TestCreateUser(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	// Values at the limits, and hostile ones, are stored as sent, trimmed
	// (the email lower-cased), on both paths. The password is stored as a
	// bcrypt hash at the configured cost, with a salt of its own even when
	// another user has the same password.
	email254 := strings.Repeat("a", 64) + "@" + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 57) + ".com"
	salts := make(map[string]bool)
	before := time.Now()
	for i, tt := range []struct{ path, first, last, email, password string }{
		{"/users/", " Ann ", "Lee", " Ann.Lee@Example.COM ", "correct horse"},
		{"/users", strings.Repeat("é", 128), "  " + strings.Repeat("a", 128) + " ", email254, strings.Repeat("€", 24)}, // 72 bytes
		{"/users/", `Robert'); DROP TABLE users;--`, `"Ann" \ 'Lee' \n` + "\u202eeciffo 👩‍💻 Łukasz ابن", "O'Brien--@Bücher.example", strings.Repeat("€", 24)},
	} {
		r := e.do("POST", tt.path, userBody(tt.first, tt.last, tt.email, tt.password))
		u := mustUser(t, r, http.StatusCreated)
		// The fields in this order, and nothing else.
		if i == 0 && !regexp.MustCompile(`^\{"id":[1-9]\d*,"first_name":"Ann","last_name":"Lee","email":"ann.lee@example.com","created_at":"[^"]+","updated_at":"[^"]+"\}\n$`).Match(r.body) {
			t.Errorf("%s: body %s, want the user trimmed, lower-cased, its fields in order", r.what, r.body)
		}
		if got := mustUser(t, e.do("GET", r.header.Get("Location"), ""), http.StatusOK); got != u || r.header.Get("Location") != fmt.Sprintf("/users/%d", u.ID) ||
			u.FirstName != strings.TrimSpace(tt.first) || u.LastName != strings.TrimSpace(tt.last) || u.Email != strings.ToLower(strings.TrimSpace(tt.email)) {
			t.Errorf("%s: %+v at Location %q, then GET %+v; want the user sent, and the same", r.what, u, r.header.Get("Location"), got)
		}
		created, updated := parseTimestamp(t, u.CreatedAt), parseTimestamp(t, u.UpdatedAt)
		if d := created.Sub(before); !created.Equal(updated) || d < -time.Minute || d > time.Minute {
			t.Errorf("created_at %s, updated_at %s: want both now", u.CreatedAt, u.UpdatedAt)
		}
		hash, salt := e.storedSecret(t, u.ID)
		if bcrypt.CompareHashAndPassword([]byte(hash), []byte(tt.password)) != nil || bcrypt.CompareHashAndPassword([]byte(hash), []byte("x"+tt.password)) == nil {
			t.Errorf("POST %s: the stored hash does not verify the password alone", tt.path)
		}
		if cost, err := bcrypt.Cost([]byte(hash)); err != nil || cost != e.hasher.cost {
			t.Errorf("POST %s: stored hash cost = %d (%v), want %d", tt.path, cost, err, e.hasher.cost)
		}
		if len(salt) != 29 || !strings.HasPrefix(hash, salt) || !strings.HasPrefix(salt, "$2a$") || salts[salt] {
			t.Errorf("POST %s: salt %q is not the 29-character prefix of hash %q, or another user's", tt.path, salt, hash)
		}
		salts[salt] = true
	}
}

// TestLookAlikeAddresses registers a second spelling of each address. NFC
// makes one account of canonically equal spellings, found by look-up and
// sign-in either way; what NFC leaves apart (compatibility forms, other
// scripts) stays two accounts, as in python-email-validator. (TestRules
// refuses invisible characters.)
func TestLookAlikeAddresses(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	const one, refused, two = "one account", "refused", "two accounts"
	tests := []struct{ first, second, want string }{
		{"jürgen@a.example", "ju\u0308rgen@a.example", one}, {"ju\u0308rgen@b.example", "JÜRGEN@b.example", one},
		{"a@bücher.example", "a@bu\u0308cher.example", one}, {"한@c.example", "\u1112\u1161\u11ab@c.example", one},
		{"ậ@d.example", "a\u0302\u0323@d.example", one}, {"kelvin@e.example", "\u212aelvin@e.example", one},
		{"å@f.example", "\u212b@f.example", one}, {"zoë@g.example", " ZOË@G.example ", one},
		{"ann@i.example", "ａｎｎ@i.example", two}, {"ann@j.example", "ann@ｊ.example", two},
		{"ann@k.example", "аnn@k.example", two}, {"fi@l.example", "ﬁ@l.example", two}, {"a@m.example", "𝐚@m.example", two},
		// Parts of 63 bytes that NFC makes 126: too long once normalized.
		{"ann@n.example", strings.Repeat("\u0958", 21) + "@" + strings.Repeat("\u0958", 21) + ".example", refused},
	}
	for _, tt := range tests {
		e.createUser(t, "Ann", "Lee", tt.first, "passw0rd-1")
		got := e.do("POST", "/users", userBody("Ann", "Lee", tt.second, "passw0rd-1"))
		switch tt.want {
		case two:
			mustUser(t, got, http.StatusCreated)
		case refused:
			if e := mustError(t, got, http.StatusBadRequest, "Invalid data"); e.Errors["email"] == "" {
				t.Errorf("%s: errors %v, want one for email", got.what, e.Errors)
			}
		default:
			mustError(t, got, http.StatusBadRequest, "Email already registered")
			for _, email := range []string{tt.first, tt.second} {
				found := mustList(t, e.do("GET", "/users?email="+url.QueryEscape(email), ""))
				signedIn := mustUser(t, e.authenticate(email, "passw0rd-1"), http.StatusOK)
				if len(found) != 1 || found[0].Email != signedIn.Email {
					t.Errorf("look-up and sign-in as %+q: %v and %v, want the account of %+q", email, found, signedIn, tt.first)
				}
			}
		}
	}
}

// TestUpdateUser follows a user from create to delete, with conditional
// requests: each field changes alone, normalized; updated_at and the ETag
// move only when something changed, created_at never.
func TestUpdateUser(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	r := e.do("POST", "/users", userBody("Ann", "Lee", "ann@example.com", "passw0rd-1"))
	u, path, tag := mustUser(t, r, http.StatusCreated), r.header.Get("Location"), r.header.Get("ETag")
	other := e.createUser(t, "Bob", "Ray", "bob@example.com", "passw0rd-2")
	hash0, salt0 := e.storedSecret(t, u.ID)
	if tag != `"1"` {
		t.Fatalf("%s: ETag %q, want \"1\"", r, tag)
	}
	prev := u
	for _, step := range []struct {
		method, body, header string
		status               int
		want                 string // the user's names and email after a 200
		changes              bool
	}{
		{"GET", "", "", 200, "Ann Lee ann@example.com", false},
		{"GET", "", "If-None-Match: {tag}", 304, "", false},
		{"GET", "", `If-None-Match: "9", W/{tag}`, 304, "", false},
		{"GET", "", "If-None-Match: *", 304, "", false},
		{"GET", "", `If-None-Match: "9"`, 200, "Ann Lee ann@example.com", false},
		{"PUT", `{}`, "", 200, "Ann Lee ann@example.com", false},
		{"PUT", `{"first_name":"Ann","email":"ANN@example.com","last_name":" Lee "}`, "", 200, "Ann Lee ann@example.com", false},
		{"PUT", `{"first_name":"  Anna "}`, `If-Match: "9", {tag}`, 200, "Anna Lee ann@example.com", true},
		{"PUT", `{"last_name":"Smith"}`, "If-Match: *", 200, "Anna Smith ann@example.com", true},
		{"PUT", `{"email":" Anna@Example.com"}`, "", 200, "Anna Smith anna@example.com", true},
		{"PUT", `{"first_name":null,"last_name":null,"email":"ANNA@EXAMPLE.COM"}`, "", 200, "Anna Smith anna@example.com", false},
		{"PUT", `{"password":"new password"}`, "If-Match: {tag}", 200, "Anna Smith anna@example.com", true},
		{"GET", "", "If-None-Match: {tag}", 304, "", false},
	} {
		r := e.do(step.method, path, step.body, strings.ReplaceAll(step.header, "{tag}", tag))
		if got := r.header.Get("ETag"); r.status != step.status || (got != tag) != step.changes ||
			r.status == 304 && (len(r.body) > 0 || r.header.Get("Content-Type") != "") {
			t.Fatalf("%s %s, ETag %q (was %q); want %d, a new ETag %v", r, step.header, got, tag, step.status, step.changes)
		}
		if tag = r.header.Get("ETag"); r.status != 200 {
			continue
		}
		got := mustUser(t, r, http.StatusOK)
		want := userJSON{u.ID, "", "", "", u.CreatedAt, prev.UpdatedAt}
		fmt.Sscan(step.want, &want.FirstName, &want.LastName, &want.Email)
		if step.changes {
			if !parseTimestamp(t, got.UpdatedAt).After(parseTimestamp(t, prev.UpdatedAt)) {
				t.Errorf("%s: updated_at %s did not move past %s", r.what, got.UpdatedAt, prev.UpdatedAt)
			}
			want.UpdatedAt = got.UpdatedAt
		}
		if got != want {
			t.Fatalf("%s %s = %+v, want %+v", r.what, step.body, got, want)
		}
		if again := mustUser(t, e.do("GET", path, ""), http.StatusOK); again != got {
			t.Errorf("GET after %s %s = %+v, want %+v", r.what, step.body, again, got)
		}
		prev = got
	}
	// A new password gets a new salt and hash; the old password stops working.
	hash1, salt1 := e.storedSecret(t, u.ID)
	if hash1 == hash0 || salt1 == salt0 || bcrypt.CompareHashAndPassword([]byte(hash1), []byte("new password")) != nil ||
		bcrypt.CompareHashAndPassword([]byte(hash1), []byte("passw0rd-1")) == nil {
		t.Errorf("after a new password: hash %q, salt %q; want new ones that match the new password alone", hash1, salt1)
	}
	r = e.do("DELETE", path, "", "If-Match: "+tag)
	if r.status != http.StatusNoContent || len(r.body) > 0 || r.header.Get("Content-Type") != "" || r.header.Get("ETag") != "" {
		t.Fatalf("%s, ETag %q; want 204 and nothing else", r, r.header.Get("ETag"))
	}
	// The user is gone, the other kept, and the address free again.
	mustError(t, e.do("GET", path, ""), http.StatusNotFound, "User not found")
	mustError(t, e.do("DELETE", path, ""), http.StatusNotFound, "User not found")
	mustError(t, e.do("PUT", path, `{"first_name":"X"}`), http.StatusNotFound, "User not found")
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", other.ID), ""), http.StatusOK); got != other {
		t.Errorf("the other user changed: %+v, want %+v", got, other)
	}
	e.createUser(t, "Ann", "Again", "ann@example.com", "passw0rd-1")
}

// TestListUsers checks the whole list, streamed in batches and cut on a
// failure, its pages and the look-up by email.
func TestListUsers(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	// On an empty table, the whole list is 404, a page [], HEAD as GET.
	none, empty := "404 {\"detail\":\"No users found\"}\n", "200 []\n"
	for path, want := range map[string]string{"/users": none, "/users/": none, "/users/?limit=10": empty, "/users/?after_id=0": empty} {
		if r := e.do("GET", path, ""); fmt.Sprintf("%d %s", r.status, r.body) != want || e.do("HEAD", path, "").status != r.status {
			t.Errorf("%s on an empty table, want %q, and HEAD the same status", r, want)
		}
	}
	const n = 2*listBatchSize + 7 // three batches, the last not full
	seedUsers(t, e.store, n+1)
	e.do("DELETE", "/users/3", "")
	r := e.do("GET", "/users/", "")
	all := mustList(t, r)
	byID := func(a, b userJSON) int { return cmp.Compare(a.ID, b.ID) }
	if len(all) != n || slices.ContainsFunc(all, func(u userJSON) bool { return u.ID == 3 }) || !slices.IsSortedFunc(all, byID) {
		t.Fatalf("%s gave %d users, want the %d left, by id", r.what, len(all), n)
	}
	if strings.Count(string(r.body), "\n") != 1 || !strings.HasSuffix(string(r.body), "}]\n") || r.header.Get("Link") != "" {
		t.Errorf("%s: the streamed list is not one compact line like the pages, without Link", r.what)
	}
	// The same on /users; from the middle of the first batch, across the
	// others; and exactly one batch.
	for path, want := range map[string][]userJSON{
		"/users": all,
		fmt.Sprintf("/users/?after_id=%d", all[listBatchSize/2-1].ID): all[listBatchSize/2:],
		fmt.Sprintf("/users?after_id=%d", all[listBatchSize+6].ID):    all[listBatchSize+7:],
	} {
		if got := mustList(t, e.do("GET", path, "")); !slices.Equal(got, want) {
			t.Errorf("GET %s gave %d users, want the last %d", path, len(got), len(want))
		}
	}
	// A look-up by email finds its one user, whatever the case and spaces.
	for _, q := range []string{"user5@example.com", "USER5@EXAMPLE.COM", "%20User5@Example.com%20", "user5%40example.com"} {
		r := e.do("GET", "/users/?email="+q, "")
		if got := mustList(t, r); len(got) != 1 || got[0] != all[3] || r.header.Get("Link") != "" {
			t.Errorf("%s = %v, Link %q; want [%v] and no Link", r.what, got, r.header.Get("Link"), all[3])
		}
	}

	// Follow Link from the first page to the last: there is one on a full
	// page only.
	var got []userJSON
	pages := 0
	for path := fmt.Sprintf("/users/?limit=%d", listBatchSize); path != ""; pages++ {
		r := e.do("GET", path, "")
		page := mustList(t, r)
		got = append(got, page...)
		m := regexp.MustCompile(`^<(/users/\?[^>]+)>; rel="next"$`).FindStringSubmatch(r.header.Get("Link"))
		if (m != nil) != (len(page) == listBatchSize) {
			t.Fatalf("%s: Link = %q on a page of %d, want <...>; rel=\"next\" on a full one", r.what, r.header.Get("Link"), len(page))
		}
		if path = ""; m != nil {
			path = m[1]
		}
	}
	if pages != 3 || !slices.Equal(got, all) {
		t.Errorf("pages gave %d users in %d pages, want the %d of the full list in 3", len(got), pages, len(all))
	}
	// A full last page still links to the empty page past the end, on the
	// path asked.
	r = e.do("GET", fmt.Sprintf("/users?limit=5&after_id=%d", all[n-6].ID), "")
	if page := mustList(t, r); len(page) != 5 || !strings.HasPrefix(r.header.Get("Link"), "</users?") {
		t.Errorf("%s: %d users, Link %q; want 5 and a Link on /users", r.what, len(page), r.header.Get("Link"))
	}
	for _, path := range []string{
		fmt.Sprintf("/users/?limit=5&after_id=%d", all[n-1].ID),
		fmt.Sprintf("/users/?after_id=%d", all[n-1].ID),
	} {
		if r := e.do("GET", path, ""); string(r.body) != "[]\n" || r.status != http.StatusOK {
			t.Errorf("%s past the end, want 200 []", r)
		}
	}
	if page := mustList(t, e.do("GET", "/users/?limit=1&after_id=0", "")); len(page) != 1 || page[0] != all[0] {
		t.Errorf("limit=1&after_id=0 gave %v, want the first user", page)
	}

	// A row that cannot be read, in the third batch: the first two are sent
	// with the 200, and the stream is then cut, never ended as a list that
	// looks whole. Second: GET fails, and HEAD, which reads one row, does not.
	breakRow := func(id string) {
		if _, err := e.store.db.Exec(`ALTER TABLE users ALTER COLUMN first_name DROP NOT NULL;
			UPDATE users SET first_name = NULL WHERE id = (SELECT ` + id + ` FROM users)`); err != nil {
			t.Fatal(err)
		}
	}
	breakRow("max(id)")
	resp, err := noRedirects.Get(e.url + "/users/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if n := bytes.Count(body, []byte(`"id":`)); resp.StatusCode != http.StatusOK || err == nil || n != 2*listBatchSize {
		t.Fatalf("GET /users/ with a bad row in the third batch: %d, %d users, read error %v; want 200, the first two batches, a cut", resp.StatusCode, n, err)
	}
	breakRow("min(id) + 1")
	mustError(t, e.do("GET", "/users/", ""), http.StatusInternalServerError, "Internal server error")
	for _, path := range []string{"/users", "/users/", "/users/?after_id=0", "/users/?after_id=999999"} {
		r := e.do("HEAD", path, "")
		if r.status != http.StatusOK || r.header.Get("Content-Type") != "application/json" || len(r.body) != 0 {
			t.Errorf("%s, Content-Type %q; want 200, application/json and no body", r, r.header.Get("Content-Type"))
		}
	}
}

func TestWholeTableStreamsAreBounded(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	// Queries wait for the lock below: a bound of a minute, not 5 s.
	st := newStoreWith(t, databaseURL, testPool, time.Minute)
	const streams = 2
	e := newTestEnv(t, withStore(st), withOptions(serverOptions{maxStreams: streams, streamStall: streamStall}))
	seedUsers(t, st, 3)

	// The lock holds every read of the table until released: the streams
	// that start hold their slots meanwhile.
	tx, err := adminDB.Begin()
	if err != nil {
		t.Fatal(err)
	}
	release := sync.OnceFunc(func() { tx.Rollback() })
	t.Cleanup(release)
	if _, err := tx.Exec(`LOCK TABLE ` + schema + `.users IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	held := make(chan response, streams+2)
	get := func(path string) { go func() { held <- e.do("GET", path, "") }() }
	for i := 0; i < streams; i++ {
		get("/users/")
	}
	waitUntil(t, "2 streams to hold a connection", func() bool { return st.db.Stats().InUse >= streams })

	// One more is refused at once (a wait would last until the test's
	// client gives up, a failure too); HEAD answers what a GET would get.
	for _, rq := range []string{"GET /users/", "GET /users?after_id=1", "HEAD /users/"} {
		method, path, _ := strings.Cut(rq, " ")
		if r := e.do(method, path, ""); r.status != http.StatusServiceUnavailable || r.header.Get("Retry-After") == "" ||
			method == "GET" && !strings.Contains(string(r.body), `"Service unavailable"`) {
			t.Errorf("%s with every stream slot taken, Retry-After %q; want 503 Service unavailable with Retry-After", r, r.header.Get("Retry-After"))
		}
	}
	// Pages and single reads are not streams: they wait for the table too.
	get("/users/?limit=10")
	get("/users/1")
	waitUntil(t, "a page and a read to wait for the table too", func() bool { return st.db.Stats().InUse >= streams+2 })
	release()
	for i := 0; i < streams+2; i++ {
		if r := <-held; r.status != http.StatusOK {
			t.Errorf("%s, want 200", r)
		}
	}
	// The slots are free again.
	if got := mustList(t, e.do("GET", "/users/", "")); len(got) != 3 {
		t.Errorf("GET /users/ after the streams gave %d users, want 3", len(got))
	}
}

// A list stream waits for a client as long as it keeps reading, however
// slowly, and cuts one that reads nothing for streamStall, freeing its slot.
// The list outgrows the kernel's buffers, and the client's receive buffer is
// small, so the server waits on the client's reading itself.
func TestListStreamWaitsForProgress(t *testing.T) {
	t.Parallel()
	const users = 15000 // some 6 MB, in batches of 400 KB
	e := newTestEnv(t, withOptions(serverOptions{maxStreams: 1, streamStall: 3 * time.Second}))
	seedUsers(t, e.store, users)
	if _, err := e.store.db.Exec(`UPDATE users SET first_name = repeat('F', 128), last_name = repeat('L', 128)`); err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{DialContext: dialSmallBuffer}}
	t.Cleanup(client.CloseIdleConnections)

	// At 40 KiB/s, a batch takes longer than the stall bound, but no chunk
	// does; then the rest at once.
	resp, err := client.Get(e.url + "/users/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	var body bytes.Buffer
	for ; body.Len() < 200<<10 && err == nil; <-tick.C {
		_, err = io.CopyN(&body, resp.Body, 1<<10)
	}
	if err == nil {
		_, err = body.ReadFrom(resp.Body)
	}
	var got []userJSON
	if err != nil || json.Unmarshal(body.Bytes(), &got) != nil || len(got) != users {
		t.Fatalf("GET /users/ read slowly: %d users in %d bytes, read error %v; want all %d", len(got), body.Len(), err, users)
	}

	// A client that stops reading after the status holds the only slot,
	// until it is cut.
	c, err := dialSmallBuffer(context.Background(), "tcp", strings.TrimPrefix(e.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "GET /users/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
	status := make([]byte, len("HTTP/1.1 200"))
	if _, err := io.ReadFull(c, status); err != nil || string(status) != "HTTP/1.1 200" {
		t.Fatalf("GET /users/ to stop reading: %q, %v; want HTTP/1.1 200", status, err)
	}
	last := fmt.Sprintf("/users/?after_id=%d", got[users-1].ID)
	waitUntil(t, "the stalled stream to be cut", func() bool { return e.do("GET", last, "").status == http.StatusOK })
}

// dialSmallBuffer dials with a 16 KiB socket receive buffer.
func dialSmallBuffer(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10) })
	}}
	return d.DialContext(ctx, network, addr)
}

// Middleware.

func TestAccessLog(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	e.createUser(t, "Ann", "Lee", "ann@example.com", "log-me-not-123")
	long := "/" + strings.Repeat("x", 198) + "éé"
	// One line per request, with its id and client; the method and the
	// path are cut at 200 bytes, at a character's start.
	tests := []struct{ method, path, want string }{
		{"POST", "/users/", `method=POST path=/users/ pattern="POST /users/{$}" status=201 duration=`}, // the create
		{"GET", "/users/1", `method=GET path=/users/1 pattern="GET /users/{id}" status=200 duration=`},
		{"GET", "/users/2", `method=GET path=/users/2 pattern="GET /users/{id}" status=404 duration=`},
		{"GET", "/nowhere", `method=GET path=/nowhere pattern="" status=404 duration=`},
		{"PATCH", "/users/1", `method=PATCH path=/users/1 pattern="" status=405 duration=`},
		{"GET", "/users//1", `method=GET path=/users//1 pattern="" status=404 duration=`},
		{"GET", long, `method=GET path=` + long[:199] + ` pattern="" status=404 duration=`},
		{strings.Repeat("A", 300), "/users/", `method=` + strings.Repeat("A", 200) + ` path=/users/ pattern="" status=405 duration=`},
	}
	for i, tt := range tests[1:] {
		id := fmt.Sprintf("id-%d", i+1)
		if r := e.do(tt.method, tt.path, "", "X-Request-Id: "+id); r.header.Get("X-Request-Id") != id {
			t.Errorf("%s: X-Request-Id %q, want the client's %s back", r, r.header.Get("X-Request-Id"), id)
		}
	}
	lines := strings.Split(strings.TrimSpace(e.logs.String()), "\n")
	if len(lines) != len(tests) {
		t.Fatalf("%d log lines for %d requests:\n%s", len(lines), len(tests), e.logs)
	}
	for i, tt := range tests {
		id := fmt.Sprintf("id-%d", i)
		if i == 0 {
			id = `[A-Z2-7]{10}-1`
		}
		if !regexp.MustCompile(`msg=request request_id=`+id+` client=127\.0\.0\.1 `).MatchString(lines[i]) || !strings.Contains(lines[i], tt.want) {
			t.Errorf("log line of %s %.40s = %q, want its id, client and %q", tt.method, tt.path, lines[i], tt.want)
		}
	}
	if strings.Contains(e.logs.String(), "log-me-not-123") || strings.Contains(e.logs.String(), "ann@example.com") {
		t.Errorf("the log holds a request body:\n%s", e.logs)
	}
}

func TestRequestID(t *testing.T) {
	t.Parallel()
	s := &server{idPrefix: "made-"}
	for _, tt := range []struct {
		ids  []string
		want string
	}{
		{nil, "made-1"}, {[]string{"abc-123_X.Y:z"}, "abc-123_X.Y:z"}, {[]string{strings.Repeat("a", 128)}, strings.Repeat("a", 128)},
		{[]string{strings.Repeat("a", 129)}, "made-2"}, {[]string{""}, "made-3"}, {[]string{"a b"}, "made-4"},
		{[]string{"é"}, "made-5"}, {[]string{"a\x7f"}, "made-6"}, {[]string{"a", "b"}, "made-7"},
	} {
		r := httptest.NewRequest("GET", "/", nil)
		r.Header["X-Request-Id"] = tt.ids
		if got := s.requestID(r); got != tt.want {
			t.Errorf("requestID with X-Request-Id %.40q = %q, want %q", tt.ids, got, tt.want)
		}
	}
}

// TestLogLinesAreBounded sends what makes long log lines, on every path that
// logs, each request half-closed: the longest line must stay within 2 KiB.
// A create and an update wait for a hashing slot until their client leaves:
// neither gets a success or does its work. A health check, half-closed as
// some probes and proxies do, still gets the truth.
func TestLogLinesAreBounded(t *testing.T) {
	t.Parallel()
	h := newHasher(bcrypt.MinCost, 1, time.Minute)
	e := newTestEnv(t, withHasher(h))
	zeros := "/users/" + strings.Repeat("0", 60000) + "1"
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	h.slots <- struct{}{}
	create, update := userBody("Bob", "Ray", "bob@example.com", "passw0rd-1"), `{"password":"passw0rd-2","first_name":"Changed"}`
	requests := []string{
		fmt.Sprintf("POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(create), create),
		fmt.Sprintf("PUT %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", zeros, len(update), update),
		"GET " + zeros + " HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET /" + strings.Repeat("%ff%00", 10000) + " HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET /users/?email=" + strings.Repeat("a", 60000) + " HTTP/1.1\r\nHost: x\r\n\r\n",
		strings.Repeat("M", 60000) + " / HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + strings.Repeat("\\\"", 30000) + "\r\n\r\n",
	}
	for range 20 { // a race, if any, between the half-close and the check
		requests = append(requests, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: "+strings.Repeat("\\\"", 64)+"\r\n\r\n")
	}
	for i, request := range requests {
		got := rawRequest(t, e, request, true)
		if i < 2 && bytes.HasPrefix(got, []byte("HTTP/1.1 2")) || i >= 6 && !bytes.HasPrefix(got, []byte("HTTP/1.1 200 ")) {
			t.Errorf("%.60q, half-closed: %q; want no success for work not done, 200 for a health check", request, got)
		}
	}
	<-h.slots
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u || countUsers(t, e.store) != 1 {
		t.Errorf("after the requests of clients that left: %+v and %d users, want %+v alone", got, countUsers(t, e.store), u)
	}
	longest := ""
	for _, line := range strings.Split(e.logs.String(), "\n") {
		if len(line) > len(longest) {
			longest = line
		}
	}
	if logs := e.logs.String(); !strings.Contains(logs, "msg=\"request canceled\"") || strings.Contains(logs, "level=WARN") || len(longest) > 2048 {
		t.Errorf("longest log line %d bytes, want at most 2048, a canceled request logged and no warning:\n%s", len(longest), logs)
	}
}

// TestAccessGuards checks, on every route, the API token and, without one,
// the refusal of a foreign Host. A 401, and the answer to a request whose
// declared body the handler does not read, close the connection: net/http
// would otherwise wait for the body, holding a MAX_CLIENTS place.
func TestAccessGuards(t *testing.T) {
	t.Parallel()
	const token = "tok-3f9a"
	e := newTestEnv(t, withToken(token), withServer(func(s *http.Server) { s.ReadTimeout = time.Hour }))
	local := newTestEnv(t, withOptions(serverOptions{maxStreams: 1, streamStall: streamStall, loopbackHostsOnly: true}))
	u := local.createUser(t, "Ann", "Lee", "ann@example.com", "passw0rd-1")
	for _, rt := range (&server{}).routes() {
		var body string
		if rt.method == http.MethodPost || rt.method == http.MethodPut {
			body = userBody("Bob", "Ray", "bob@example.com", "passw0rd-2")
		}
		path := strings.NewReplacer("{$}", "", "{id}", strconv.FormatInt(u.ID, 10)).Replace(rt.pattern)
		for _, host := range []string{"evil.example:8000", "127.0.0.1.evil.example"} {
			mustError(t, local.do(rt.method, path, body, "Host: "+host), http.StatusMisdirectedRequest, "Misdirected request")
		}
		if rt.public {
			if r := e.do(rt.method, path, ""); r.status != http.StatusOK {
				t.Errorf("%s without a token, want 200", r)
			}
			continue
		}
		for _, auth := range []string{"Authorization:", "Authorization: Bearer", "Authorization: Bearer wrong",
			"Authorization: Bearer " + token + "x", "Authorization: Basic " + token, "Authorization: " + token,
			"Authorization: Bearer  " + token} {
			r := e.do(rt.method, path, body, auth)
			if mustError(t, r, http.StatusUnauthorized, "Not authenticated"); r.header.Get("WWW-Authenticate") != "Bearer" {
				t.Errorf("%s with %q: WWW-Authenticate = %q, want Bearer", r.what, auth, r.header.Get("WWW-Authenticate"))
			}
		}
	}
	mustError(t, local.do("GET", "/nope", "", "Host: evil.example"), http.StatusMisdirectedRequest, "Misdirected request")
	for _, host := range []string{"localhost:8000", "127.0.0.1", "[::1]:8000"} {
		mustUser(t, local.do("GET", fmt.Sprintf("/users/%d", u.ID), "", "Host: "+host), http.StatusOK)
	}
	if n, m, failures := countUsers(t, e.store), countUsers(t, local.store), countRows(t, e.store, "sign_in_failures"); n != 0 || m != 1 || failures != 0 {
		t.Fatalf("refused requests stored %d and %d users, counted failures for %d addresses; want 0, 1 and none", n, m, failures)
	}
	// The scheme is case-insensitive.
	u = mustUser(t, e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "passw0rd-1"), "Authorization: Bearer "+token), http.StatusCreated)
	mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), "", "Authorization: bearer "+token), http.StatusOK)
	mustUser(t, e.do("POST", "/users/authenticate", authBody("ann@example.com", "passw0rd-1"), "Authorization: Bearer "+token), http.StatusOK)
	for request, status := range map[string]string{
		"GET /users/ HTTP/1.1\r\nHost: localhost\r\n\r\n":                                                           "401",
		"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n\r\n":                                     "200",
		"POST /users/ HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n": "401",
	} {
		if got := rawRequest(t, e, request, false); !bytes.HasPrefix(got, []byte("HTTP/1.1 "+status+" ")) ||
			!bytes.Contains(got, []byte("\r\nConnection: close\r\n")) {
			t.Errorf("%q: answer %q, want %s with Connection: close", request, got, status)
		}
	}
}

func TestPanicIsRecovered(t *testing.T) {
	t.Parallel()
	logs := &syncBuffer{}
	s := &server{logger: newTestLogger(logs)}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /panic", func(http.ResponseWriter, *http.Request) { panic("handler bug") })
	mux.HandleFunc("GET /half", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		w.Write([]byte(`[{"id":1},`))
		http.NewResponseController(w).Flush()
		panic("failed mid-stream")
	})
	e := &testEnv{t: t, url: newTestHTTPServer(t, s.wrap(mux))}
	mustError(t, e.do("GET", "/panic", ""), http.StatusInternalServerError, "Internal server error")
	// A panic after the answer started cannot change the status: the
	// connection is cut, so the chunked body never ends.
	if got := rawRequest(t, e, "GET /half HTTP/1.1\r\nHost: x\r\n\r\n", false); !bytes.HasSuffix(got, []byte(`[{"id":1},`+"\r\n")) {
		t.Errorf("GET /half: %q, want a body cut after what the handler wrote before its panic", got)
	}
	for _, want := range []string{`msg=panic request_id=1 client=127.0.0.1 method=GET path=/panic pattern="GET /panic" panic="handler bug" stack=`, "users_test.go",
		`pattern="GET /panic" status=500`, `panic="failed mid-stream"`, `pattern="GET /half" status=200 duration=`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
}

// rawRequest sends request on a connection of its own, closes its side
// if closeWrite, and returns all the server sends until it closes the
// connection, failing the test if it holds it open for 20 s.
func rawRequest(t *testing.T, e *testEnv, request string, closeWrite bool) []byte {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	if closeWrite {
		conn.(*net.TCPConn).CloseWrite()
	}
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(conn)
	if os.IsTimeout(err) {
		t.Fatalf("%.60q: the connection is still open 20s after %q", request, got)
	}
	return got
}

// TestSlowBodyHoldsNoDatabaseConnection checks that a request takes a
// database connection only once its body is in: a client that sends its
// body slowly, or never in full, holds none.
func TestSlowBodyHoldsNoDatabaseConnection(t *testing.T) {
	t.Parallel()
	databaseURL, _ := newSchema(t)
	st := newStoreWith(t, databaseURL, poolConfig{maxOpen: 1, maxIdle: 1, maxIdleTime: time.Minute}, 5*time.Second)
	e := newTestEnv(t, withStore(st))
	body := userBody("Ann", "Lee", "ann@example.com", "passw0rd-1")
	head := fmt.Sprintf("POST /users/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", len(body))

	conn, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, head+body[:10])
	// The one connection serves others while the body is still coming.
	mustError(t, e.do("GET", "/users/1", ""), http.StatusNotFound, "User not found")
	io.WriteString(conn, body[10:])
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	if resp, err := http.ReadResponse(bufio.NewReader(conn), nil); err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("the create whose body came slowly: %v, %v; want 201", resp, err)
	}
	// A body cut short is refused, and stores nothing.
	if got := rawRequest(t, e, head+body[:10], true); !bytes.HasPrefix(got, []byte("HTTP/1.1 400 ")) {
		t.Errorf("a body cut short: %q, want 400", got)
	}
	if n := countUsers(t, st); n != 1 {
		t.Errorf("%d users stored, want the one whose body came whole", n)
	}
}

// Failures and secrets.

// TestHashingShares checks what waits for a hashing slot: past its client's
// share (half the slots, rounded up) it gets 429 at once, the other slots
// staying free for other clients; past every slot, 503 after the wait.
// Neither hashes nor counts a failure.
func TestHashingShares(t *testing.T) {
	t.Parallel()
	h, active, _, release := gatedHasher(3, 50*time.Millisecond) // a share of 2
	e := newTestEnv(t, withStore(newClockedStore(t, newTestClock())), withHasher(h))
	other, third := e.from("127.0.0.2"), e.from("127.0.0.3")
	// Registered after the server, so that it runs before the server's
	// close, which waits for the requests the gate holds.
	letGo := sync.OnceFunc(func() { close(release) })
	t.Cleanup(letGo)
	for range 5 {
		countAuthFailure(t, e.store, "bob@example.com", "127.0.0.3")
	}
	results := make(chan response, 3)
	create := func(e *testEnv, email string) {
		results <- e.do("POST", "/users/", userBody("Ann", "Lee", email, "passw0rd-1"))
	}
	go create(e, "a1@example.com")
	go create(e, "a2@example.com")
	waitUntil(t, "two hashes to start", func() bool { return active.Load() == 2 })
	go create(other, "b@example.com")
	waitUntil(t, "another client's hash to start", func() bool { return active.Load() == 3 })
	for _, rq := range []struct{ method, path, body string }{
		{"POST", "/users/", userBody("Bob", "Ray", "bob@example.com", "passw0rd-1")},
		{"POST", "/users", userBody("Bob", "Ray", "bob@example.com", "passw0rd-1")},
		{"PUT", "/users/1", `{"password":"passw0rd-2"}`},
		{"POST", "/users/authenticate", authBody("carol@example.com", "passw0rd-1")},
	} {
		r := e.do(rq.method, rq.path, rq.body)
		if mustError(t, r, http.StatusTooManyRequests, "Too many requests"); r.header.Get("Retry-After") != "1" {
			t.Errorf("%s: Retry-After %q, want 1", r.what, r.header.Get("Retry-After"))
		}
		r = third.do(rq.method, rq.path, rq.body)
		if mustError(t, r, http.StatusServiceUnavailable, "Service unavailable"); r.header.Get("Retry-After") == "" {
			t.Errorf("%s: no Retry-After", r.what)
		}
	}
	if n := countRows(t, e.store, "sign_in_failures"); n != 5 {
		t.Errorf("%d failures counted, want bob's 5 alone: a 429 or 503 counts nothing", n)
	}
	// What needs no hashing is served meanwhile, an early attempt too.
	mustError(t, third.do("GET", "/users/", ""), http.StatusNotFound, "No users found")
	mustThrottled(t, third.authenticate("bob@example.com", "passw0rd-1"), 1)
	letGo()
	for range 3 {
		mustUser(t, <-results, http.StatusCreated)
	}
	if n := countUsers(t, e.store); n != 3 {
		t.Errorf("%d users stored, want the first 3 alone", n)
	}
}

// TestNoSecrets checks that no password, hash or salt is in an answer or in
// the log, whatever the request and however it fails; and that a fault on
// the server's side is a generic 500, its cause logged with its request.
func TestNoSecrets(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	const password, newPassword = "first-Secret-pw", "second-Secret-pw"
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", password)
	hash1, salt1 := e.storedSecret(t, u.ID)
	path := fmt.Sprintf("/users/%d", u.ID)
	responses := []response{
		e.do("PUT", path, `{"password":"`+newPassword+`"}`),
		e.do("POST", "/users/", userBody("Bob", "Ray", "bob@example.com", password)),
		e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", password)),
		e.do("POST", "/users/", userBody("Ann", "Lee", "not-an-email", password)),
		e.do("GET", path, ""),
		e.do("GET", "/users/", ""),
		e.do("GET", "/users/?limit=1", ""),
		e.do("PUT", path, `{"password":"`+password+`","email":"bad"}`),
		e.do("PUT", "/users/999999", `{"password":"`+password+`"}`),
		e.authenticate("ann@example.com", newPassword),
		e.authenticate("ann@example.com", password),
		e.do("POST", "/users/authenticate", `{"email":"bad","password":"`+password+`"}`),
	}
	hash2, salt2 := e.storedSecret(t, u.ID)
	// A fault on the server's side: the table is not what the code expects.
	if _, err := e.store.db.Exec(`ALTER TABLE users RENAME COLUMN first_name TO given_name`); err != nil {
		t.Fatal(err)
	}
	failed := []response{
		e.do("POST", "/users/", userBody("Cy", "Day", "cy@example.com", password)),
		e.do("POST", "/users", userBody("Cy", "Day", "cy@example.com", password)),
		e.do("PUT", path, `{"password":"`+newPassword+`"}`),
		e.authenticate("ann@example.com", newPassword),
		e.do("GET", path, ""),
		e.do("GET", "/users/", ""),
		e.do("GET", "/users", ""),
	}
	if _, err := e.store.db.Exec(`ALTER TABLE users RENAME TO gone`); err != nil {
		t.Fatal(err)
	}
	failed = append(failed, e.do("DELETE", path, "")) // DELETE reads no name
	for _, r := range failed {
		mustError(t, r, http.StatusInternalServerError, "Internal server error")
		if strings.Contains(string(r.body), "first_name") || strings.Contains(string(r.body), "pq") {
			t.Errorf("%s: the answer leaks the cause: %s", r.what, r.body)
		}
	}
	logs := e.logs.String()
	if !regexp.MustCompile(`level=ERROR msg="internal error" request_id=\S+ client=127.0.0.1 method=PUT path=/users/\d+ err=.*(given_name|first_name)`).MatchString(logs) {
		t.Errorf("the log does not hold the cause with its request:\n%s", logs)
	}
	for _, r := range append(responses, append(failed, response{what: "the log", body: []byte(logs)})...) {
		for _, secret := range []string{password, newPassword, "Secret", hash1, salt1, hash2, salt2, salt1[7:], salt2[7:], `"password"`, `"salt"`} {
			if strings.Contains(string(r.body), secret) || strings.Contains(fmt.Sprint(r.header), secret) {
				t.Errorf("%s: it contains %q", r, secret)
			}
		}
	}
}

// openapi.json, written by hand, is kept true to the code: every answer a
// test gets through testEnv.do must be documented for its route, and after
// a full passing run TestMain fails if openapi.json documents an answer, or
// an operation, that no test produced.

// specResponses maps "METHOD routeKey(path)" of each operation in
// openapi.json to its responses, by status.
var specResponses = sync.OnceValue(func() map[string]map[string]any {
	var spec struct {
		Paths map[string]map[string]struct{ Responses map[string]any }
	}
	json.Unmarshal(openAPI, &spec) // if it fails, every answer is undocumented
	ops := make(map[string]map[string]any)
	for path, item := range spec.Paths {
		for method, op := range item {
			ops[strings.ToUpper(method)+" "+routeKey(path)] = op.Responses
		}
	}
	return ops
})

// routeKey gives a mux pattern's path and an OpenAPI path one form:
// "/users/{$}" is "/users/", and every wildcard or parameter is "{}".
func routeKey(path string) string {
	return regexp.MustCompile(`\{[^}/]*\}`).ReplaceAllString(strings.TrimSuffix(path, "{$}"), "{}")
}

// answered holds "METHOD routeKey status" of every answer checkAnswer saw.
var answered sync.Map

// routeMux finds a request's pattern in routes(), as the server does.
var routeMux = sync.OnceValue(func() *http.ServeMux {
	mux := http.NewServeMux()
	for _, rt := range (&server{}).routes() {
		mux.Handle(rt.method+" "+rt.pattern, http.NotFoundHandler())
	}
	return mux
})

// checkAnswer records which route answered req and with what status, and
// fails the test if openapi.json does not document that answer.
func (e *testEnv) checkAnswer(req *http.Request, r response) {
	e.t.Helper()
	_, pattern := routeMux().Handler(req)
	if req.Method == http.MethodHead || pattern == "" || !isCleanPath(req.URL.EscapedPath()) ||
		req.URL.Path == "/users/authenticate" && req.Method != http.MethodPost {
		return // HEAD, served by GET and not described; or no route's answer
	}
	method, path, _ := strings.Cut(pattern, " ")
	key, status := method+" "+routeKey(path), strconv.Itoa(r.status)
	answered.Store(key+" "+status, true)
	if specResponses()[key][status] == nil {
		e.t.Errorf("%s: openapi.json documents no %s for %s; answer: %.300s", r.what, status, pattern, r.body)
	}
}

// fullRun reports whether this run ran every test: no -run, -skip or -list.
func fullRun() bool {
	for _, name := range []string{"test.run", "test.skip", "test.list"} {
		if f := flag.Lookup(name); f != nil && f.Value.String() != "" {
			return false
		}
	}
	return true
}

// checkAnswersDocumented writes to w each answer openapi.json documents that
// no test produced, and returns whether there was none. TestMain calls it
// after a full run passed.
func checkAnswersDocumented(w io.Writer) bool {
	var missing []string
	for op, responses := range specResponses() {
		for status := range responses {
			if _, ok := answered.Load(op + " " + status); !ok {
				missing = append(missing, op+" "+status)
			}
		}
	}
	sort.Strings(missing)
	for _, m := range missing {
		fmt.Fprintf(w, "FAIL: openapi.json documents %s, which no test produced: add a test, or take it out if the code cannot answer it\n", m)
	}
	return len(missing) == 0
}

func TestOpenAPIAndDocsAreServed(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	if r := e.do("GET", "/openapi.json", ""); !bytes.Equal(r.body, openAPI) || !regexp.MustCompile(`^\{\s*"openapi": "3\.1\.\d+"`).Match(r.body) {
		t.Errorf("%.200s, want the OpenAPI 3.1 description the service embeds", r)
	}
	r := e.do("GET", "/docs", "")
	// Without its scripts (the CDN out of reach), the page still shows text
	// and a link to the description.
	static := regexp.MustCompile(`(?s)<script.*?</script>|<head>.*</head>`).ReplaceAllString(string(r.body), "")
	if mt, _, _ := mime.ParseMediaType(r.header.Get("Content-Type")); r.status != http.StatusOK || mt != "text/html" ||
		!strings.Contains(string(r.body), `url: "/openapi.json"`) || !strings.Contains(static, `<a href="/openapi.json">`) {
		t.Fatalf("%s, Content-Type %q; want 200, an HTML page that loads /openapi.json, and links it without scripts", r, r.header.Get("Content-Type"))
	}
	// Every file the page loads from elsewhere names an exact release and
	// carries its hash: .ci/run checks the hashes.
	pinned := regexp.MustCompile(`(?:src|href)="https://cdn\.jsdelivr\.net/npm/swagger-ui-dist@\d+\.\d+\.\d+/[\w.-]+" integrity="sha384-[A-Za-z0-9+/]{64}" crossorigin="anonymous"`)
	external := 0
	for _, tag := range regexp.MustCompile(`<(?:script|link)\b[^>]*>`).FindAllString(string(r.body), -1) {
		if strings.Contains(tag, "://") {
			external++
			if !pinned.MatchString(tag) {
				t.Errorf("%s: %s is not pinned to a release and a sha384 hash, with crossorigin", r.what, tag)
			}
		}
	}
	if external != 2 {
		t.Errorf("%s: %d files from elsewhere, want 2 (the stylesheet and the script):\n%s", r.what, external, r.body)
	}
}

// TestOpenAPIPatternsFollowTheRules checks the patterns openapi.json gives
// email and names against the service's own rules: whatever the service
// accepts, the pattern allows (so a validating client never refuses a good
// value), and the pattern refuses what a regular expression can tell.
func TestOpenAPIPatternsFollowTheRules(t *testing.T) {
	t.Parallel()
	// pattern is the pattern at components.path in openapi.json; "" (any
	// string) if there is none, which the refusals below catch.
	pattern := func(path string) *regexp.Regexp {
		var node any
		json.Unmarshal(openAPI, &node)
		for _, name := range strings.Split("components."+path+".pattern", ".") {
			m, _ := node.(map[string]any)
			node = m[name]
		}
		p, _ := node.(string)
		return regexp.MustCompile(p)
	}
	stored := pattern("schemas.User.properties.email")
	emails := []*regexp.Regexp{pattern("schemas.UserCreate.properties.email"), pattern("schemas.UserUpdate.properties.email"), pattern("parameters.Email.schema")}
	for _, email := range goodEmails {
		raw := " \t" + email + "\n "
		if got, _ := cleanEmail(raw); !stored.MatchString(got) {
			t.Errorf("User.email pattern refuses %q, which the service stores", got)
		}
		for _, re := range emails {
			if !re.MatchString(raw) {
				t.Errorf("pattern %s refuses %q, which the service accepts", re, raw)
			}
		}
	}
	for _, email := range []string{
		"a@ex!ample.com", "a@exa{m}ple.com", "a@ex_ample.com", "a@-example.com", "a@example-.com",
		strings.Repeat("a", 65) + "@example.com", "a@" + strings.Repeat("b", 64) + ".com",
		"a@b", `"q"@example.com`, "a@[127.0.0.1]", ".a@example.com", "a.@example.com", "a b@example.com",
	} {
		for _, re := range append(emails, stored) {
			if re.MatchString(email) {
				t.Errorf("pattern %s allows %q, which the service refuses", re, email)
			}
		}
	}
	for _, schema := range []string{"UserCreate", "UserUpdate"} {
		for _, field := range []string{"first_name", "last_name"} {
			re := pattern("schemas." + schema + ".properties." + field)
			for _, name := range goodNames {
				if !re.MatchString(name) {
					t.Errorf("%s.%s: pattern refuses %.40q, which the service accepts", schema, field, name)
				}
			}
			// A pattern cannot tell what JSON decoding made of an unpaired
			// surrogate.
			for _, name := range badNames {
				if re.MatchString(name) && !strings.ContainsRune(name, '\uFFFD') {
					t.Errorf("%s.%s: pattern allows %.40q, which the service refuses", schema, field, name)
				}
			}
		}
	}
}

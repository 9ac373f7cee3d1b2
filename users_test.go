package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/mail"
	"net/url"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/bcrypt"
)

// userJSON is a user as the API sends it.
type userJSON struct {
	ID        int64  `json:"id"`
	FirstName string `json:"first_name"`
	LastName  string `json:"last_name"`
	Email     string `json:"email"`
	CreatedAt string `json:"created_at"`
	UpdatedAt string `json:"updated_at"`
}

// errorJSON is an error as the API sends it.
type errorJSON struct {
	Detail string            `json:"detail"`
	Errors map[string]string `json:"errors"`
}

// userBody returns a create body; fields set to "" are left out.
func userBody(first, last, email, password string) string {
	m := map[string]string{}
	for k, v := range map[string]string{"first_name": first, "last_name": last, "email": email, "password": password} {
		if v != "" {
			m[k] = v
		}
	}
	b, _ := json.Marshal(m)
	return string(b)
}

// mustUser checks that r is status with a user body, and returns the user.
func mustUser(t *testing.T, r response, status int) userJSON {
	t.Helper()
	if r.status != status {
		t.Fatalf("%s, want %d", r, status)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type = %q, want application/json", r.what, ct)
	}
	var u userJSON
	dec := json.NewDecoder(strings.NewReader(string(r.body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&u); err != nil {
		t.Fatalf("%s: body %s: %v", r.what, r.body, err)
	}
	return u
}

// mustError checks that r is status with {"detail": detail}, and returns the
// error body.
func mustError(t *testing.T, r response, status int, detail string) errorJSON {
	t.Helper()
	if r.status != status {
		t.Fatalf("%s, want %d %q", r, status, detail)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type = %q, want application/json", r.what, ct)
	}
	var e errorJSON
	if err := json.Unmarshal(r.body, &e); err != nil {
		t.Fatalf("%s: body %s: %v", r.what, r.body, err)
	}
	if e.Detail != detail {
		t.Fatalf("%s: detail = %q, want %q", r.what, e.Detail, detail)
	}
	return e
}

// mustInvalid checks that r is 400 Invalid data naming field among errors.
func mustInvalid(t *testing.T, r response, field string) {
	t.Helper()
	e := mustError(t, r, http.StatusBadRequest, "Invalid data")
	if _, ok := e.Errors[field]; !ok {
		t.Fatalf("%s: errors = %v, want an entry for %q", r.what, e.Errors, field)
	}
}

func (e *testEnv) createUser(t *testing.T, first, last, email, password string) userJSON {
	t.Helper()
	return mustUser(t, e.do("POST", "/users/", userBody(first, last, email, password)), http.StatusCreated)
}

// storedSecret reads the password hash and salt stored for a user.
func (e *testEnv) storedSecret(t *testing.T, id int64) (hash, salt string) {
	t.Helper()
	err := e.store.db.QueryRow(`SELECT password, salt FROM users WHERE id = $1`, id).Scan(&hash, &salt)
	if err != nil {
		t.Fatalf("read stored password of user %d: %v", id, err)
	}
	return hash, salt
}

// utcMicros is how the API writes timestamps: RFC 3339 in UTC, fractional
// seconds only as far as PostgreSQL keeps them.
var utcTimestamp = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$`)

func parseTimestamp(t *testing.T, s string) time.Time {
	t.Helper()
	if !utcTimestamp.MatchString(s) {
		t.Fatalf("timestamp %q is not RFC 3339 in UTC", s)
	}
	ts, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("timestamp %q: %v", s, err)
	}
	return ts
}

func TestCreateUser(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	before := time.Now()
	r := e.do("POST", "/users/", `{"first_name":" Ann ","last_name":"Lee","email":" Ann.Lee@Example.COM ","password":"correct horse"}`)
	u := mustUser(t, r, http.StatusCreated)

	if u.ID <= 0 {
		t.Errorf("id = %d, want a positive id", u.ID)
	}
	if got, want := r.header.Get("Location"), fmt.Sprintf("/users/%d", u.ID); got != want {
		t.Errorf("Location = %q, want %q", got, want)
	}
	if u.FirstName != "Ann" || u.LastName != "Lee" {
		t.Errorf("names = %q %q, want trimmed \"Ann\" \"Lee\"", u.FirstName, u.LastName)
	}
	if u.Email != "ann.lee@example.com" {
		t.Errorf("email = %q, want it trimmed and lower-cased", u.Email)
	}
	created, updated := parseTimestamp(t, u.CreatedAt), parseTimestamp(t, u.UpdatedAt)
	if !created.Equal(updated) {
		t.Errorf("created_at %s != updated_at %s on a new user", u.CreatedAt, u.UpdatedAt)
	}
	if d := created.Sub(before); d < -time.Minute || d > time.Minute {
		t.Errorf("created_at %s is %v away from now", u.CreatedAt, d)
	}

	// The fields come in the seed's order, and nothing else comes.
	keys := regexp.MustCompile(`"([a-z_]+)":`).FindAllStringSubmatch(string(r.body), -1)
	var order []string
	for _, k := range keys {
		order = append(order, k[1])
	}
	if got, want := strings.Join(order, ","), "id,first_name,last_name,email,created_at,updated_at"; got != want {
		t.Errorf("body keys = %s, want %s", got, want)
	}

	got := mustUser(t, e.do("GET", r.header.Get("Location"), ""), http.StatusOK)
	if got != u {
		t.Errorf("GET after create = %+v, want %+v", got, u)
	}
}

func TestCreateUserOnBothPaths(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for i, path := range []string{"/users", "/users/"} {
		email := fmt.Sprintf("user%d@example.com", i)
		u := mustUser(t, e.do("POST", path, userBody("Ann", "Lee", email, "password1")), http.StatusCreated)
		if u.Email != email {
			t.Errorf("POST %s: email = %q, want %q", path, u.Email, email)
		}
		r := e.do("GET", path, "")
		if r.status != http.StatusOK {
			t.Errorf("%s, want 200", r)
		}
	}
}

// TestErrorsOnBothCollectionPaths checks that /users answers errors as
// /users/ does, not only successes.
func TestErrorsOnBothCollectionPaths(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	big := `{"first_name":"` + strings.Repeat("a", maxBodyBytes) + `"}`
	for _, path := range []string{"/users", "/users/"} {
		mustInvalid(t, e.do("POST", path, `{"first_name":"Bob"}`), "last_name")
		mustError(t, e.do("POST", path, userBody("Ann", "Lee", "ANN@example.com", "password1")),
			http.StatusBadRequest, "Email already registered")
		mustError(t, e.do("POST", path, big), http.StatusRequestEntityTooLarge, "Request body too large")
		mustInvalid(t, e.do("GET", path+"?limit=0", ""), "limit")
		mustError(t, e.do("GET", path+"?email=bob@example.com", ""), http.StatusNotFound, "No users found")
	}
}

func TestCreateUserValidation(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	valid := map[string]string{"first_name": "Ann", "last_name": "Lee", "password": "password1"}
	n := 0
	body := func(field, value string) string {
		m := map[string]string{"email": fmt.Sprintf("v%d@example.com", n)}
		n++
		for k, v := range valid {
			m[k] = v
		}
		m[field] = value
		b, _ := json.Marshal(m)
		return string(b)
	}
	// 254 bytes within the part limits: a local part of 64, labels of 63.
	label57 := strings.Repeat("d", 57)
	email254 := strings.Repeat("a", 64) + "@" + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + label57 + ".com"
	email255 := strings.Replace(email254, label57, label57+"d", 1)
	tests := []struct {
		name, field, value string
		ok                 bool
	}{
		{"name of 1 character", "first_name", "A", true},
		{"name of 128 characters, 256 bytes", "first_name", strings.Repeat("é", 128), true},
		{"name of 129 characters", "first_name", strings.Repeat("é", 129), false},
		{"name of 129 ASCII characters", "last_name", strings.Repeat("a", 129), false},
		{"name of 128 characters after trimming", "last_name", "  " + strings.Repeat("a", 128) + "  ", true},
		{"empty name", "first_name", "", false},
		{"blank name", "last_name", "   ", false},
		{"name with a newline", "first_name", "Ann\nLee", false},
		{"name with a NUL", "last_name", "Lee\x00", false},
		{"name with a tab", "last_name", "Lee\tLee", false},
		{"name with spaces, hyphen and apostrophe", "last_name", "O'Brien-Smith de la Cruz", true},
		{"name in another script", "first_name", "李小龍", true},
		{"right-to-left name", "first_name", "שָׁלוֹם", true},
		{"email of 254 bytes", "email", email254, true},
		{"email of 255 bytes", "email", email255, false},
		{"email of 254 bytes that grows in lower case", "email", strings.Replace(email254, "dd", "Ⱥ", 1), false},
		{"email without @", "email", "ann.example.com", false},
		{"email with display name", "email", "Ann <ann@example.com>", false},
		{"email in angle brackets", "email", "<ann@example.com>", false},
		{"two emails", "email", "ann@example.com, bob@example.com", false},
		{"empty email", "email", "", false},
		{"password of 7 characters", "password", "1234567", false},
		{"password of 8 characters", "password", "12345678", true},
		{"password of 7 characters in 14 bytes", "password", strings.Repeat("é", 7), false},
		{"password of 72 bytes", "password", strings.Repeat("p", 72), true},
		{"password of 73 bytes", "password", strings.Repeat("p", 73), false},
		{"password of 24 characters in 72 bytes", "password", strings.Repeat("€", 24), true},
		{"password of 25 characters in 75 bytes", "password", strings.Repeat("€", 25), false},
		{"password of spaces only", "password", "        ", true},
		{"password with a control character", "password", "pass\u0001word", false},
		{"password with U+FFFD, as from an unpaired surrogate", "password", "passwo\uFFFDrd1", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do("POST", "/users/", body(tt.field, tt.value))
			if !tt.ok {
				mustInvalid(t, r, tt.field)
				if strings.Contains(string(r.body), tt.value) && tt.value != "" {
					t.Errorf("%s: the error repeats the rejected value", r.what)
				}
				return
			}
			u := mustUser(t, r, http.StatusCreated)
			want := strings.TrimSpace(tt.value)
			switch tt.field {
			case "first_name":
				if u.FirstName != want {
					t.Errorf("first_name = %q, want %q", u.FirstName, want)
				}
			case "last_name":
				if u.LastName != want {
					t.Errorf("last_name = %q, want %q", u.LastName, want)
				}
			case "email":
				if u.Email != strings.ToLower(want) {
					t.Errorf("email = %q, want %q", u.Email, want)
				}
			case "password":
				hash, _ := e.storedSecret(t, u.ID)
				if err := bcrypt.CompareHashAndPassword([]byte(hash), []byte(tt.value)); err != nil {
					t.Errorf("stored hash does not verify the password: %v", err)
				}
			}
		})
	}
}

func TestCreateUserRequiresEveryField(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for _, field := range []string{"first_name", "last_name", "email", "password"} {
		t.Run(field+" missing", func(t *testing.T) {
			m := map[string]string{"first_name": "Ann", "last_name": "Lee", "email": "ann@example.com", "password": "password1"}
			delete(m, field)
			b, _ := json.Marshal(m)
			mustInvalid(t, e.do("POST", "/users/", string(b)), field)
		})
		t.Run(field+" null", func(t *testing.T) {
			m := map[string]any{"first_name": "Ann", "last_name": "Lee", "email": "ann@example.com", "password": "password1"}
			m[field] = nil
			b, _ := json.Marshal(m)
			mustInvalid(t, e.do("POST", "/users/", string(b)), field)
		})
	}
	mustError(t, e.do("GET", "/users/", ""), http.StatusNotFound, "No users found")
}

func TestMalformedBodies(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	okBody := `{"first_name":"Bob","last_name":"Lee","email":"bob@example.com","password":"password1"`
	tests := []struct {
		name, body, field string
	}{
		{"empty body", "", "body"},
		{"not JSON", "first_name=Bob", "body"},
		{"truncated JSON", okBody, "body"},
		{"trailing JSON", okBody + `}{}`, "body"},
		{"trailing garbage", okBody + `}x`, "body"},
		{"array", `[` + okBody + `}]`, "body"},
		{"string", `"hello"`, "body"},
		{"null", `null`, "body"},
		{"invalid UTF-8", `{"first_name":"B` + "\xff" + `b","last_name":"Lee","email":"bob@example.com","password":"password1"}`, "body"},
		{"unknown field", okBody + `,"admin":true}`, "admin"},
		{"field in another case", `{"First_Name":"Bob","last_name":"Lee","email":"bob@example.com","password":"password1"}`, "First_Name"},
		{"number for a string", `{"first_name":1,"last_name":"Lee","email":"bob@example.com","password":"password1"}`, "first_name"},
		{"object for a string", `{"first_name":"Bob","last_name":"Lee","email":{"a":1},"password":"password1"}`, "email"},
		{"id is not writable", okBody + `,"id":7}`, "id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mustInvalid(t, e.do("POST", "/users/", tt.body), tt.field)
			mustInvalid(t, e.do("PUT", fmt.Sprintf("/users/%d", u.ID), tt.body), tt.field)
		})
	}
	t.Run("body over 1 MiB", func(t *testing.T) {
		big := `{"first_name":"` + strings.Repeat("a", maxBodyBytes) + `"}`
		mustError(t, e.do("POST", "/users/", big), http.StatusRequestEntityTooLarge, "Request body too large")
		mustError(t, e.do("PUT", fmt.Sprintf("/users/%d", u.ID), big), http.StatusRequestEntityTooLarge, "Request body too large")
	})
	t.Run("body of exactly 1 MiB", func(t *testing.T) {
		b := `{"first_name":"Bob","last_name":"Lee","email":"bob@example.com","password":"password1"}`
		b += strings.Repeat(" ", maxBodyBytes-len(b))
		mustUser(t, e.do("POST", "/users/", b), http.StatusCreated)
	})
	// Nothing above may have changed the first user or added another.
	var count int
	if err := e.store.db.QueryRow(`SELECT count(*) FROM users`).Scan(&count); err != nil {
		t.Fatal(err)
	}
	if count != 2 {
		t.Errorf("%d users stored, want 2", count)
	}
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
		t.Errorf("user after rejected updates = %+v, want %+v", got, u)
	}
}

func TestDuplicateEmail(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	e.createUser(t, "Ann", "Lee", "Ann@Example.com", "password1")
	for _, email := range []string{"ann@example.com", "ANN@EXAMPLE.COM", "  ann@example.com  "} {
		mustError(t, e.do("POST", "/users/", userBody("Other", "Person", email, "password2")),
			http.StatusBadRequest, "Email already registered")
	}
	if r := e.do("GET", "/users/", ""); strings.Count(string(r.body), `"id"`) != 1 {
		t.Errorf("%s, want exactly one user", r)
	}
}

func TestConcurrentCreatesOfOneEmail(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	const n = 20
	statuses := make(chan response, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			// Different cases of one address, all at once.
			email := "Same@Example.com"
			if i%2 == 0 {
				email = "same@example.COM"
			}
			statuses <- e.do("POST", "/users/", userBody("Ann", "Lee", email, "password1"))
		}(i)
	}
	wg.Wait()
	close(statuses)
	created := 0
	for r := range statuses {
		switch {
		case r.status == http.StatusCreated:
			created++
		case r.status == http.StatusBadRequest && strings.Contains(string(r.body), "Email already registered"):
		default:
			t.Errorf("%s, want 201 or 400 Email already registered", r)
		}
	}
	if created != 1 {
		t.Errorf("%d creates succeeded, want exactly 1", created)
	}
}

// badIDs are user ids that are not positive integers fitting int64.
var badIDs = []string{"abc", "0", "-1", "1.5", "+1", "1e3", "99999999999999999999", "9223372036854775808", "%20"}

func TestUserIDs(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	for _, id := range badIDs {
		for _, method := range []string{"GET", "PUT", "DELETE"} {
			body := ""
			if method == "PUT" {
				body = `{"first_name":"Bob"}`
			}
			mustError(t, e.do(method, "/users/"+id, body), http.StatusNotFound, "User not found")
		}
	}
	// The largest int64 is a valid id that nobody has.
	mustError(t, e.do("GET", "/users/9223372036854775807", ""), http.StatusNotFound, "User not found")
	mustError(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID+1), ""), http.StatusNotFound, "User not found")
	// Leading zeros still name the same user.
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/00%d", u.ID), ""), http.StatusOK); got.ID != u.ID {
		t.Errorf("GET /users/00%d = user %d", u.ID, got.ID)
	}
}

func TestUpdateUser(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	other := e.createUser(t, "Bob", "Ray", "bob@example.com", "password2")
	path := fmt.Sprintf("/users/%d", u.ID)
	hash0, salt0 := e.storedSecret(t, u.ID)

	// Each field alone, leaving the others as they are.
	steps := []struct {
		body string
		want userJSON
	}{
		{`{"first_name":"  Anna "}`, userJSON{FirstName: "Anna", LastName: "Lee", Email: "ann@example.com"}},
		{`{"last_name":"Smith"}`, userJSON{FirstName: "Anna", LastName: "Smith", Email: "ann@example.com"}},
		{`{"email":" Anna@Example.com"}`, userJSON{FirstName: "Anna", LastName: "Smith", Email: "anna@example.com"}},
		{`{"first_name":null,"last_name":null,"email":"anna@example.com"}`, userJSON{FirstName: "Anna", LastName: "Smith", Email: "anna@example.com"}},
	}
	last := u
	for _, step := range steps {
		got := mustUser(t, e.do("PUT", path, step.body), http.StatusOK)
		if got.FirstName != step.want.FirstName || got.LastName != step.want.LastName || got.Email != step.want.Email || got.ID != u.ID {
			t.Fatalf("PUT %s %s = %+v, want %+v", path, step.body, got, step.want)
		}
		if got.CreatedAt != u.CreatedAt {
			t.Errorf("PUT %s: created_at changed from %s to %s", step.body, u.CreatedAt, got.CreatedAt)
		}
		if mustUser(t, e.do("GET", path, ""), http.StatusOK) != got {
			t.Errorf("GET after PUT %s does not show the update", step.body)
		}
		last = got
	}

	// A new password gets a new salt and hash; the old password stops working.
	got := mustUser(t, e.do("PUT", path, `{"password":"new password"}`), http.StatusOK)
	hash1, salt1 := e.storedSecret(t, u.ID)
	if hash1 == hash0 || salt1 == salt0 {
		t.Errorf("new password kept the old hash or salt")
	}
	if bcrypt.CompareHashAndPassword([]byte(hash1), []byte("new password")) != nil ||
		bcrypt.CompareHashAndPassword([]byte(hash1), []byte("password1")) == nil {
		t.Errorf("stored hash does not match the new password alone")
	}
	if !parseTimestamp(t, got.UpdatedAt).After(parseTimestamp(t, last.UpdatedAt)) {
		t.Errorf("password change: updated_at %s did not move past %s", got.UpdatedAt, last.UpdatedAt)
	}

	// An email taken by someone else, in any case, is a conflict; one's own is not.
	mustError(t, e.do("PUT", path, `{"email":"BOB@example.com"}`), http.StatusBadRequest, "Email already registered")
	if got := mustUser(t, e.do("PUT", path, `{"email":"ANNA@EXAMPLE.COM"}`), http.StatusOK); got.Email != "anna@example.com" {
		t.Errorf("changing email to its own value in upper case gave %q", got.Email)
	}
	if mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", other.ID), ""), http.StatusOK) != other {
		t.Errorf("the other user changed")
	}

	// Empty strings are invalid; a body with every field invalid changes nothing.
	for _, field := range []string{"first_name", "last_name", "email", "password"} {
		mustInvalid(t, e.do("PUT", path, fmt.Sprintf(`{%q:""}`, field)), field)
	}
	mustInvalid(t, e.do("PUT", path, `{"first_name":"`+strings.Repeat("x", 129)+`"}`), "first_name")
	mustInvalid(t, e.do("PUT", path, `{"password":"`+strings.Repeat("x", 73)+`"}`), "password")
	mustUser(t, e.do("PUT", path, `{"last_name":"`+strings.Repeat("x", 128)+`"}`), http.StatusOK)
	mustUser(t, e.do("PUT", path, `{"password":"`+strings.Repeat("x", 72)+`"}`), http.StatusOK)

	mustError(t, e.do("PUT", fmt.Sprintf("/users/%d", other.ID+100), `{"first_name":"X"}`), http.StatusNotFound, "User not found")
}

func TestUpdatedAtMovesOnlyOnChange(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	path := fmt.Sprintf("/users/%d", u.ID)

	for _, body := range []string{`{}`, `{"first_name":"Ann"}`, `{"email":"ANN@example.com","last_name":" Lee "}`} {
		got := mustUser(t, e.do("PUT", path, body), http.StatusOK)
		if got != u {
			t.Errorf("PUT %s changed nothing but answered %+v, want %+v", body, got, u)
		}
	}
	prev := u
	for i := 0; i < 5; i++ {
		got := mustUser(t, e.do("PUT", path, fmt.Sprintf(`{"first_name":"Ann%d"}`, i)), http.StatusOK)
		if !parseTimestamp(t, got.UpdatedAt).After(parseTimestamp(t, prev.UpdatedAt)) {
			t.Errorf("update %d: updated_at %s did not move past %s", i, got.UpdatedAt, prev.UpdatedAt)
		}
		if got.CreatedAt != u.CreatedAt {
			t.Errorf("update %d: created_at changed", i)
		}
		prev = got
	}
}

func TestDeleteUser(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	keep := e.createUser(t, "Bob", "Ray", "bob@example.com", "password2")
	path := fmt.Sprintf("/users/%d", u.ID)

	r := e.do("DELETE", path, "")
	if r.status != http.StatusNoContent || len(r.body) != 0 {
		t.Fatalf("%s, want 204 with an empty body", r)
	}
	if ct := r.header.Get("Content-Type"); ct != "" {
		t.Errorf("%s: Content-Type = %q on an empty body", r.what, ct)
	}
	mustError(t, e.do("GET", path, ""), http.StatusNotFound, "User not found")
	mustError(t, e.do("DELETE", path, ""), http.StatusNotFound, "User not found")
	mustError(t, e.do("PUT", path, `{"first_name":"X"}`), http.StatusNotFound, "User not found")
	mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", keep.ID), ""), http.StatusOK)
	// The address is free again.
	e.createUser(t, "Ann", "Again", "ann@example.com", "password1")
}

func TestListUsers(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for _, path := range []string{"/users", "/users/"} {
		mustError(t, e.do("GET", path, ""), http.StatusNotFound, "No users found")
	}
	var want []userJSON
	for i := 0; i < 5; i++ {
		want = append(want, e.createUser(t, "User", strconv.Itoa(i), fmt.Sprintf("u%d@example.com", i), "password1"))
	}
	e.do("DELETE", fmt.Sprintf("/users/%d", want[2].ID), "")
	want = append(want[:2], want[3:]...)

	for _, path := range []string{"/users", "/users/"} {
		r := e.do("GET", path, "")
		got := mustList(t, r)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s = %v, want %v", r.what, got, want)
		}
		if r.header.Get("Link") != "" {
			t.Errorf("%s: Link = %q on a full list", r.what, r.header.Get("Link"))
		}
	}
}

// mustList checks that r is 200 with a JSON array of users, and returns it.
func mustList(t *testing.T, r response) []userJSON {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("%s, want 200", r)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type = %q, want application/json", r.what, ct)
	}
	var users []userJSON
	dec := json.NewDecoder(strings.NewReader(string(r.body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&users); err != nil {
		t.Fatalf("%s: body %.200s: %v", r.what, r.body, err)
	}
	if users == nil {
		t.Fatalf("%s: body %s, want an array", r.what, r.body)
	}
	return users
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

func TestListStreamsEveryBatch(t *testing.T) {
	t.Parallel()
	t.Run("exactly one batch", func(t *testing.T) {
		t.Parallel()
		e := newTestEnv(t)
		seedUsers(t, e.store, listBatchSize)
		if got := mustList(t, e.do("GET", "/users/", "")); len(got) != listBatchSize {
			t.Errorf("GET /users/ returned %d users, want %d", len(got), listBatchSize)
		}
	})
	e := newTestEnv(t)
	const n = 2*listBatchSize + 7
	seedUsers(t, e.store, n)
	r := e.do("GET", "/users/", "")
	users := mustList(t, r)
	if strings.Count(string(r.body), "\n") != 1 || !strings.HasSuffix(string(r.body), "}]\n") {
		t.Errorf("streamed list is not one compact line like the pages")
	}
	if len(users) != n {
		t.Fatalf("GET /users/ returned %d users, want %d", len(users), n)
	}
	for i := 1; i < len(users); i++ {
		if users[i].ID <= users[i-1].ID {
			t.Fatalf("users[%d].id = %d after %d: not ordered by id", i, users[i].ID, users[i-1].ID)
		}
	}
	rest := mustList(t, e.do("GET", fmt.Sprintf("/users/?after_id=%d", users[listBatchSize].ID), ""))
	if len(rest) != n-listBatchSize-1 || rest[0].ID != users[listBatchSize+1].ID {
		t.Errorf("after_id=%d gave %d users starting at %d, want %d starting at %d",
			users[listBatchSize].ID, len(rest), rest[0].ID, n-listBatchSize-1, users[listBatchSize+1].ID)
	}
}

func TestListPagination(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	seedUsers(t, e.store, 25)
	all := mustList(t, e.do("GET", "/users/", ""))

	// Follow Link from the first page to the last.
	var got []userJSON
	path := "/users/?limit=10"
	pages := 0
	for path != "" {
		r := e.do("GET", path, "")
		page := mustList(t, r)
		got = append(got, page...)
		pages++
		path = ""
		if link := r.header.Get("Link"); link != "" {
			m := regexp.MustCompile(`^<([^>]+)>; rel="next"$`).FindStringSubmatch(link)
			if m == nil {
				t.Fatalf("%s: Link = %q, want <...>; rel=\"next\"", r.what, link)
			}
			if len(page) != 10 {
				t.Errorf("%s: Link on a page of %d", r.what, len(page))
			}
			path = m[1]
		} else if len(page) == 10 {
			t.Errorf("%s: no Link on a full page", r.what)
		}
	}
	if pages != 3 || fmt.Sprint(got) != fmt.Sprint(all) {
		t.Errorf("pages gave %d users in %d pages, want the %d of the full list in 3", len(got), pages, len(all))
	}

	// Exactly one full last page still links to the empty page past the end.
	r := e.do("GET", fmt.Sprintf("/users?limit=5&after_id=%d", all[19].ID), "")
	if page := mustList(t, r); len(page) != 5 || r.header.Get("Link") == "" {
		t.Errorf("%s: %d users, Link %q; want 5 and a Link", r.what, len(page), r.header.Get("Link"))
	}
	if !strings.HasPrefix(r.header.Get("Link"), "</users?") {
		t.Errorf("%s: Link = %q, want it on the path asked", r.what, r.header.Get("Link"))
	}
	for _, path := range []string{
		fmt.Sprintf("/users/?limit=5&after_id=%d", all[24].ID),
		fmt.Sprintf("/users/?after_id=%d", all[24].ID),
	} {
		r := e.do("GET", path, "")
		if page := mustList(t, r); len(page) != 0 || string(r.body) != "[]\n" {
			t.Errorf("%s past the end = %q, want []", r.what, r.body)
		}
	}
	if page := mustList(t, e.do("GET", "/users/?limit=1000", "")); len(page) != 25 {
		t.Errorf("limit=1000 gave %d users, want 25", len(page))
	}
	if page := mustList(t, e.do("GET", "/users/?limit=1&after_id=0", "")); len(page) != 1 || page[0] != all[0] {
		t.Errorf("limit=1&after_id=0 gave %v, want the first user", page)
	}

	for _, q := range []string{"limit=0", "limit=1001", "limit=-1", "limit=abc", "limit=", "limit=1.5",
		"after_id=-1", "after_id=x", "after_id=99999999999999999999", "limit=1&limit=2", "page=2", "limt=10",
		"limit=1;x", "limit=%zz"} {
		e := mustError(t, e.do("GET", "/users/?"+q, ""), http.StatusBadRequest, "Invalid data")
		if len(e.Errors) == 0 {
			t.Errorf("GET /users/?%s: no errors listed", q)
		}
	}
}

func TestListOnEmptyTableWithParameters(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for _, path := range []string{"/users/?limit=10", "/users/?after_id=0"} {
		if page := mustList(t, e.do("GET", path, "")); len(page) != 0 {
			t.Errorf("GET %s on an empty table = %v, want []", path, page)
		}
	}
}

func TestErrorsAreJSON(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for _, path := range []string{"/", "/nope", "/users/1/extra", "/user"} {
		mustError(t, e.do("GET", path, ""), http.StatusNotFound, "Not Found")
	}
	tests := []struct{ method, path, allow string }{
		{"PATCH", "/users/1", "DELETE, GET, HEAD, PUT"},
		{"DELETE", "/users/", "GET, HEAD, POST"},
		{"PUT", "/users", "GET, HEAD, POST"},
		{"POST", "/healthz", "GET, HEAD"},
	}
	for _, tt := range tests {
		r := e.do(tt.method, tt.path, "")
		mustError(t, r, http.StatusMethodNotAllowed, "Method Not Allowed")
		if got := r.header.Get("Allow"); got != tt.allow {
			t.Errorf("%s: Allow = %q, want %q", r.what, got, tt.allow)
		}
	}
}

func TestNoSecretsInResponses(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	const password = "s3cret-Passw0rd"
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", password)
	hash, salt := e.storedSecret(t, u.ID)
	responses := []response{
		e.do("POST", "/users/", userBody("Bob", "Ray", "bob@example.com", password)),
		e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", password)),
		e.do("POST", "/users/", userBody("", "Lee", "x@example.com", password)),
		e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""),
		e.do("GET", "/users/", ""),
		e.do("GET", "/users/?limit=1", ""),
		e.do("PUT", fmt.Sprintf("/users/%d", u.ID), `{"password":"`+password+`"}`),
		e.do("PUT", fmt.Sprintf("/users/%d", u.ID), `{"password":"`+password+`","email":"bad"}`),
	}
	hash2, salt2 := e.storedSecret(t, u.ID)
	for _, r := range responses {
		for _, secret := range []string{password, hash, salt, hash2, salt2, `"password"`, `"salt"`} {
			if strings.Contains(string(r.body), secret) || strings.Contains(fmt.Sprint(r.header), secret) {
				t.Errorf("%s: response contains %q", r, secret)
			}
		}
	}
}

func TestStoredPasswordIsBcrypt(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	a := e.createUser(t, "Ann", "Lee", "ann@example.com", "same password")
	b := e.createUser(t, "Bob", "Ray", "bob@example.com", "same password")
	hashA, saltA := e.storedSecret(t, a.ID)
	hashB, saltB := e.storedSecret(t, b.ID)
	for _, s := range []struct{ hash, salt string }{{hashA, saltA}, {hashB, saltB}} {
		if err := bcrypt.CompareHashAndPassword([]byte(s.hash), []byte("same password")); err != nil {
			t.Errorf("stored hash %q does not verify the submitted password: %v", s.hash, err)
		}
		if err := bcrypt.CompareHashAndPassword([]byte(s.hash), []byte("same passwore")); err == nil {
			t.Errorf("stored hash verifies a wrong password")
		}
		if cost, err := bcrypt.Cost([]byte(s.hash)); err != nil || cost != e.hasher.cost {
			t.Errorf("stored hash cost = %d (%v), want %d", cost, err, e.hasher.cost)
		}
		if len(s.salt) != 29 || !strings.HasPrefix(s.hash, s.salt) || !strings.HasPrefix(s.salt, "$2a$") {
			t.Errorf("salt %q is not the 29-character prefix of hash %q", s.salt, s.hash)
		}
	}
	if saltA == saltB || hashA == hashB {
		t.Errorf("two users with one password share a salt or hash")
	}
}

func TestHealthz(t *testing.T) {
	t.Parallel()
	st := newTestStore(t)
	e := newTestEnv(t, withStore(st))
	r := e.do("GET", "/healthz", "")
	if r.status != http.StatusOK || string(r.body) != "{\"status\":\"ok\"}\n" {
		t.Errorf("%s, want 200 {\"status\":\"ok\"}", r)
	}
	st.Close()
	mustError(t, e.do("GET", "/healthz", ""), http.StatusServiceUnavailable, "Service unavailable")
}

func TestAccessLog(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	const password = "log-me-not-123"
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", password)
	e.do("GET", fmt.Sprintf("/users/%d", u.ID), "")
	e.do("GET", "/nowhere", "")
	logs := e.logs.String()
	lines := strings.Split(strings.TrimSpace(logs), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d log lines for 3 requests, want 3:\n%s", len(lines), logs)
	}
	wants := []string{
		`msg=request method=POST pattern="POST /users/{$}" status=201 duration=`,
		`msg=request method=GET pattern="GET /users/{id}" status=200 duration=`,
		`msg=request method=GET pattern="" status=404 duration=`,
	}
	for i, want := range wants {
		if !strings.Contains(lines[i], want) {
			t.Errorf("log line %d = %q, want it to contain %q", i, lines[i], want)
		}
	}
	if strings.Contains(logs, password) || strings.Contains(logs, "ann@example.com") {
		t.Errorf("the log holds a request body:\n%s", logs)
	}
}

func TestLookUpByEmail(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	ann := e.createUser(t, "Ann", "Lee", "Ann@Example.com", "password1")
	e.createUser(t, "Bob", "Ray", "bob@example.com", "password1")
	for _, q := range []string{"ann@example.com", "ANN@EXAMPLE.COM", "%20Ann@Example.com%20", "ann%40example.com"} {
		r := e.do("GET", "/users/?email="+q, "")
		if got := mustList(t, r); len(got) != 1 || got[0] != ann {
			t.Errorf("%s = %v, want [%v]", r.what, got, ann)
		}
		if r.header.Get("Link") != "" {
			t.Errorf("%s: Link on a look-up", r.what)
		}
	}
	mustError(t, e.do("GET", "/users?email=nobody@example.com", ""), http.StatusNotFound, "No users found")
	for _, q := range []string{"email=", "email=not-an-email", "email=Ann%20%3Cann@example.com%3E",
		"email=ann@example.com&email=bob@example.com", "email=ann@example.com&limit=10",
		"email=ann@example.com&after_id=0", "email=" + strings.Repeat("a", 250) + "@example.com"} {
		mustInvalid(t, e.do("GET", "/users/?"+q, ""), "email")
	}
}

// routePath is a request path for a route pattern, with id for {id}.
func routePath(pattern string, id int64) string {
	return strings.NewReplacer("{$}", "", "{id}", strconv.FormatInt(id, 10)).Replace(pattern)
}

func TestBodiesMustBeLabelledJSON(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	body := userBody("Bob", "Ray", "bob@example.com", "password2")
	var writes []route
	for _, rt := range (&server{}).routes() {
		if rt.method == http.MethodPost || rt.method == http.MethodPut {
			writes = append(writes, rt)
		}
	}
	for _, ct := range []string{
		"", "text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
		"multipart/form-data; boundary=x", "text/json", "application/jsonx", "application/json-patch+json",
		"application/json; charset=iso-8859-1", "application/json; charset", "application/json, text/plain",
	} {
		for _, rt := range writes {
			r := e.do(rt.method, routePath(rt.pattern, u.ID), body, "Content-Type: "+ct)
			mustError(t, r, http.StatusUnsupportedMediaType, "Unsupported media type")
		}
	}
	if n := countUsers(t, e.store); n != 1 {
		t.Errorf("%d users stored after bodies not labelled JSON, want 1", n)
	}
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
		t.Errorf("user after refused updates = %+v, want %+v", got, u)
	}

	for i, ct := range []string{"application/json", "application/json; charset=utf-8", "Application/JSON; Charset=\"UTF-8\"", "application/json ; foo=bar"} {
		r := e.do("POST", "/users/", userBody("Bob", "Ray", fmt.Sprintf("bob%d@example.com", i), "password2"), "Content-Type: "+ct)
		mustUser(t, r, http.StatusCreated)
		mustUser(t, e.do("PUT", fmt.Sprintf("/users/%d", u.ID), fmt.Sprintf(`{"last_name":"Lee%d"}`, i), "Content-Type: "+ct), http.StatusOK)
	}
}

func TestIsLoopbackHost(t *testing.T) {
	t.Parallel()
	for _, host := range []string{"localhost", "localhost:8000", "LocalHost:1", "localhost:", "127.0.0.1", "127.0.0.1:8000",
		"127.255.0.9:80", "[::1]", "[::1]:8000", "[0:0:0:0:0:0:0:1]:8000"} {
		if !isLoopbackHost(host) {
			t.Errorf("isLoopbackHost(%q) = false, want true", host)
		}
	}
	for _, host := range []string{"", "evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io:8000",
		"localhost.", "0.0.0.0:8000", "10.0.0.1", "128.0.0.1", "::1", "[::1]x", "[fe80::1%lo]:80", "127.1", "2130706433",
		"localhost:80x", "localhost:-1", "127.0.0.1:8000:80", "[127.0.0.1]:80", "[localhost]"} {
		if isLoopbackHost(host) {
			t.Errorf("isLoopbackHost(%q) = true, want false", host)
		}
	}
}

func TestOnlyLoopbackHostsWithoutToken(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withOptions(serverOptions{maxStreams: 1, loopbackHostsOnly: true}))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	for _, rt := range (&server{}).routes() {
		var body string
		if rt.method == http.MethodPost || rt.method == http.MethodPut {
			body = userBody("Bob", "Ray", "bob@example.com", "password2")
		}
		path := routePath(rt.pattern, u.ID)
		for _, host := range []string{"evil.example", "evil.example:8000", "127.0.0.1.evil.example"} {
			mustError(t, e.do(rt.method, path, body, "Host: "+host), http.StatusMisdirectedRequest, "Misdirected request")
		}
	}
	mustError(t, e.do("GET", "/nope", "", "Host: evil.example"), http.StatusMisdirectedRequest, "Misdirected request")
	if n := countUsers(t, e.store); n != 1 {
		t.Errorf("%d users stored through a foreign Host, want 1", n)
	}
	for _, host := range []string{"localhost:8000", "127.0.0.1", "[::1]:8000"} {
		mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), "", "Host: "+host), http.StatusOK)
	}
}

func TestUnauthorizedClosesConnection(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withToken("tok-1"))
	c, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /users/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	// ReadResponse takes Connection: close out of the header into Close.
	if resp.StatusCode != http.StatusUnauthorized || !resp.Close {
		t.Errorf("GET /users/ without a token: %d, Connection: close %v; want 401 and close", resp.StatusCode, resp.Close)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after a 401, reading the connection gave %v, want EOF: the server holds it open", err)
	}
}

func TestDuplicateMemberNames(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	for _, tt := range []struct{ name, body, field string }{
		{"email twice", `{"first_name":"Bob","last_name":"Ray","email":"a@example.com","email":"b@example.com","password":"password2"}`, "email"},
		{"same value twice", `{"first_name":"Bob","first_name":"Bob","last_name":"Ray","email":"b@example.com","password":"password2"}`, "first_name"},
		{"spelt with an escape", `{"first_name":"Bob","last_name":"Ray","email":"b@example.com","password":"password2","pass\u0077ord":"password3"}`, "password"},
		{"null then a value", `{"first_name":"Bob","last_name":"Ray","last_name":null,"email":"b@example.com","password":"password2"}`, "last_name"},
		{"unknown name twice", `{"first_name":"Bob","last_name":"Ray","email":"b@example.com","password":"password2","x":1,"x":2}`, "x"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for _, r := range []response{e.do("POST", "/users/", tt.body), e.do("PUT", fmt.Sprintf("/users/%d", u.ID), tt.body)} {
				errs := mustError(t, r, http.StatusBadRequest, "Invalid data").Errors
				if errs[tt.field] != "given more than once" {
					t.Errorf("%s: errors = %v, want %s: given more than once", r.what, errs, tt.field)
				}
			}
		})
	}
	if n := countUsers(t, e.store); n != 1 {
		t.Errorf("%d users stored from bodies with repeated names, want 1", n)
	}
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
		t.Errorf("user after refused updates = %+v, want %+v", got, u)
	}
}

func TestErrorBodiesAreBounded(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	long := strings.Repeat("n", 10000)
	escaped := strings.Repeat("\u0001<", 100) // each byte escapes to six
	escapedJSON, _ := json.Marshal(escaped)
	var fields, params strings.Builder
	fields.WriteString(`{"email":"not an address","` + long + `":1,` + string(escapedJSON) + `:1`)
	params.WriteString("limit=0&" + long + "=1&" + url.QueryEscape(escaped) + "=1")
	for i := 0; i < 2000; i++ {
		fmt.Fprintf(&fields, `,"unknown-%04d":1`, i)
		fmt.Fprintf(&params, "&unknown-%04d=1", i)
	}
	fields.WriteString("}")
	for _, tt := range []struct {
		r     response
		known string
	}{
		{e.do("POST", "/users/", fields.String()), "email"},
		{e.do("PUT", fmt.Sprintf("/users/%d", u.ID), fields.String()), "email"},
		{e.do("GET", "/users/?"+params.String(), ""), "limit"},
	} {
		errs := mustError(t, tt.r, http.StatusBadRequest, "Invalid data").Errors
		if len(tt.r.body) > 4096 || len(errs) > 20 || len(errs) == 0 {
			t.Errorf("%s: %d bytes with %d errors, want at most 4 KiB and 20", tt.r.what, len(tt.r.body), len(errs))
		}
		if _, ok := errs[tt.known]; !ok {
			t.Errorf("%s: errors %v leave out %q, a known name", tt.r.what, errs, tt.known)
		}
		for name := range errs {
			if len(name) > 64+len("…") {
				t.Errorf("%s: errors name %.80q… of %d bytes", tt.r.what, name, len(name))
			}
		}
	}
	// Names fill the 4 KiB before they reach 20.
	var escapes strings.Builder
	escapes.WriteString("{")
	for i := 0; i < 20; i++ {
		fmt.Fprintf(&escapes, `"%02d%s":1,`, i, strings.Repeat(`\u0001`, 62))
	}
	escapes.WriteString(`"first_name":"x"}`)
	r := e.do("PUT", fmt.Sprintf("/users/%d", u.ID), escapes.String())
	if errs := mustError(t, r, http.StatusBadRequest, "Invalid data").Errors; len(r.body) > 4096 || len(errs) == 0 {
		t.Errorf("%s: %d bytes with %d errors, want at most 4 KiB and some", r.what, len(r.body), len(errs))
	}
}

func TestHeadUsersReadsOneRow(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for _, path := range []string{"/users", "/users/"} {
		if r := e.do("HEAD", path, ""); r.status != http.StatusNotFound {
			t.Errorf("%s on an empty table, want 404", r)
		}
	}
	seedUsers(t, e.store, 3*listBatchSize)
	// A row that cannot be read, second in the table: GET fails on it, and
	// HEAD must not get that far.
	if _, err := e.store.db.Exec(`ALTER TABLE users ALTER COLUMN first_name DROP NOT NULL;
		UPDATE users SET first_name = NULL WHERE id = (SELECT min(id) + 1 FROM users)`); err != nil {
		t.Fatal(err)
	}
	mustError(t, e.do("GET", "/users/", ""), http.StatusInternalServerError, "Internal server error")
	for _, path := range []string{"/users", "/users/", "/users/?after_id=0"} {
		r := e.do("HEAD", path, "")
		if r.status != http.StatusOK || r.header.Get("Content-Type") != "application/json" || len(r.body) != 0 {
			t.Errorf("%s, Content-Type %q; want 200, application/json and no body", r, r.header.Get("Content-Type"))
		}
	}
	if r := e.do("HEAD", "/users/?after_id=999999", ""); r.status != http.StatusOK {
		t.Errorf("%s past the end, want 200 as GET answers []", r)
	}
}

func TestWholeTableStreamsAreBounded(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	st, err := openStore(context.Background(), databaseURL, testPool, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	const streams = 2
	e := newTestEnv(t, withStore(st), withOptions(serverOptions{maxStreams: streams}))
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
	held := make(chan response, 4)
	for i := 0; i < streams; i++ {
		go func() { held <- e.do("GET", "/users/", "") }()
	}
	waitInUse(t, st, streams)

	refused := make(chan response, 2)
	go func() { refused <- e.do("GET", "/users/", "") }()
	go func() { refused <- e.do("GET", "/users?after_id=1", "") }()
	for i := 0; i < 2; i++ {
		select {
		case r := <-refused:
			mustError(t, r, http.StatusServiceUnavailable, "Service unavailable")
			if r.header.Get("Retry-After") == "" {
				t.Errorf("%s: no Retry-After", r.what)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("a stream past the %d allowed still waits after 10s, want 503 at once", streams)
		}
	}
	// Pages and single reads are not streams: they wait for the table too.
	go func() { held <- e.do("GET", "/users/?limit=10", "") }()
	go func() { held <- e.do("GET", "/users/1", "") }()
	waitInUse(t, st, streams+2)
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

// waitInUse waits until st has n connections in use.
func waitInUse(t *testing.T, st *store, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for st.db.Stats().InUse < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d database connections in use after 20s, want %d", st.db.Stats().InUse, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestValidEmail(t *testing.T) {
	t.Parallel()
	label63 := strings.Repeat("b", 63)
	domain253 := label63 + "." + label63 + "." + label63 + "." + strings.Repeat("c", 61)
	tests := []struct {
		email string
		ok    bool
	}{
		{"ann@example.com", true},
		{"o'brien+tag@mail.example.co.uk", true},
		{"jürgen@bücher.example", true},
		{"a@xn--bcher-kva.example", true},
		{"ju\u0308rgen@bu\u0308cher.example", true}, // decomposed accents
		{"अनु@उदाहरण.भारत", true},                   // combining vowel signs
		{"Ann@Example.COM", true},
		{"!#$%&'*+/=?^_`{|}~-@example.com", true},
		{"a.b.c@example.com", true},
		{"a@123.example", true},
		{"a@ex-am-ple.c0m", true},
		{strings.Repeat("a", 64) + "@example.com", true},
		{"a@" + label63 + ".com", true},
		{"a@" + domain253, true},

		{"a@ex!ample.com", false},
		{"a@exa{m}ple.com", false},
		{"a@ex_ample.com", false},
		{"a@-example.com", false},
		{"a@example-.com", false},
		{"a@example.١٢", false},
		{strings.Repeat("a", 71) + "@example.com", false},
		{strings.Repeat("a", 65) + "@example.com", false},
		{"a@" + strings.Repeat("b", 68) + ".com", false},
		{"a@" + strings.Repeat("b", 64) + ".com", false},
		{"a@c" + domain253, false},
		{"a@b", false},
		{"a..b@example.com", false},
		{".a@example.com", false},
		{"a.@example.com", false},
		{`"q"@example.com`, false},
		{`"a b"@example.com`, false},
		{"a(comment)@example.com", false},
		{"a@[127.0.0.1]", false},
		{"a@127.0.0.1", false},
		{"a@example.123", false},
		{"a@example.com.", false},
		{"a@.example.com", false},
		{"a@example..com", false},
		{"@example.com", false},
		{"a@", false},
		{"ann.example.com", false},
		{"a@b@example.com", false},
		{"a b@example.com", false},
		{"a@exa mple.com", false},
		{"Ann <ann@example.com>", false},
		{"a\u200b@example.com", false}, // zero-width space
		{"a\u202e@example.com", false}, // right-to-left override
		{"a\x00@example.com", false},   // NUL
		{"a@exam\u00adple.com", false}, // soft hyphen
		{"\u0308a@example.com", false}, // a mark with nothing to mark
		{"a@\u0308example.com", false}, // the same in a label
		{"😀@example.com", false},       // a symbol, not a letter
		{"a\xff@example.com", false},   // not UTF-8
		{"", false},
	}
	for _, tt := range tests {
		if got := validEmail(tt.email); got != tt.ok {
			t.Errorf("validEmail(%q) = %v, want %v", tt.email, got, tt.ok)
		}
	}
}

// TestEmailRules sends the addresses the rules name to the service: those
// accepted are stored, the others are 400 with errors.email.
func TestEmailRules(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for _, email := range []string{"ann@example.com", "o'brien+tag@mail.example.co.uk", "jürgen@bücher.example", "a@xn--bcher-kva.example"} {
		if u := e.createUser(t, "Ann", "Lee", email, "password1"); u.Email != email {
			t.Errorf("created %q, stored %q", email, u.Email)
		}
	}
	for _, email := range []string{
		"a@ex!ample.com", "a@exa{m}ple.com", "a@ex_ample.com", "a@-example.com", "a@example-.com",
		strings.Repeat("a", 71) + "@example.com", "a@" + strings.Repeat("b", 68) + ".com",
		"a@b", "a..b@example.com", `"q"@example.com`, "a@[127.0.0.1]",
	} {
		mustInvalid(t, e.do("POST", "/users/", userBody("Ann", "Lee", email, "password1")), "email")
	}
}

// TestUncleanPathsAreJSON404 checks that a path the mux would redirect to
// its clean form is answered like any unknown path: a redirect would make a
// client re-send a POST as a GET without its body, and in HTML.
func TestUncleanPathsAreJSON404(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	for _, tt := range []struct{ method, path string }{
		{"GET", "//users"},
		{"POST", "//users"},
		{"GET", "/users//"},
		{"GET", "/users/./1"},
		{"PUT", "/users/../users/1"},
		{"DELETE", "/users//1"},
		{"GET", "/users/1/."},
		{"GET", "//nope"},
		{"GET", "/healthz/.."},
	} {
		r := e.do(tt.method, tt.path, "")
		mustError(t, r, http.StatusNotFound, "Not Found")
		if loc := r.header.Get("Location"); loc != "" {
			t.Errorf("%s: Location = %q, want none", r.what, loc)
		}
	}
	if r := e.do("GET", "/users/1", ""); r.status != http.StatusOK {
		t.Errorf("%s, want 200: the user is still there", r)
	}
}

func TestIsCleanPath(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		path string
		ok   bool
	}{
		{"/", true}, {"/users", true}, {"/users/", true}, {"/users/1", true}, {"/users/%2F1", true},
		{"", false}, {"users", false}, {"//", false}, {"//users", false}, {"/users//", false},
		{"/users/./1", false}, {"/users/../1", false}, {"/users/.", false}, {"/users/..", false}, {"/users/1/./", false},
	} {
		if got := isCleanPath(tt.path); got != tt.ok {
			t.Errorf("isCleanPath(%q) = %v, want %v", tt.path, got, tt.ok)
		}
	}
}

// TestAccessLogPath checks that a request no route serves is logged with
// its path, cut at 200 bytes, and that one a route serves is not.
func TestAccessLogPath(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	long := "/" + strings.Repeat("x", 198) + "éé"
	e.do("GET", "/nowhere", "")
	e.do("PATCH", "/users/1", "")
	e.do("GET", "/users//1", "")
	e.do("GET", long, "")
	e.do("GET", "/users/1", "")
	lines := strings.Split(strings.TrimSpace(e.logs.String()), "\n")
	wants := []string{
		`method=GET pattern="" status=404 duration=`, ` path=/nowhere`,
		`method=PATCH pattern="" status=405 duration=`, ` path=/users/1`,
		`method=GET pattern="" status=404 duration=`, ` path=/users//1`,
		`method=GET pattern="" status=404 duration=`, ` path=` + long[:199] + "\n",
		`method=GET pattern="GET /users/{id}" status=404 duration=`, "",
	}
	if len(lines) != len(wants)/2 {
		t.Fatalf("%d log lines for %d requests:\n%s", len(lines), len(wants)/2, e.logs)
	}
	for i, line := range lines {
		line += "\n"
		if !strings.Contains(line, wants[2*i]) || !strings.Contains(line, wants[2*i+1]) {
			t.Errorf("log line %d = %q, want %q and %q", i, line, wants[2*i], wants[2*i+1])
		}
		if wants[2*i+1] == "" && strings.Contains(line, " path=") {
			t.Errorf("log line %d = %q: a routed request's path is logged", i, line)
		}
	}
}

// TestDocsPinsItsScripts checks that every file /docs loads from elsewhere
// names an exact release and carries its hash: .ci/run checks the hashes.
func TestDocsPinsItsScripts(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	r := e.do("GET", "/docs", "")
	tags := regexp.MustCompile(`<(?:script|link)\b[^>]*>`).FindAllString(string(r.body), -1)
	pinned := regexp.MustCompile(`(?:src|href)="https://cdn\.jsdelivr\.net/npm/swagger-ui-dist@\d+\.\d+\.\d+/[\w.-]+" integrity="sha384-[A-Za-z0-9+/]{64}" crossorigin="anonymous"`)
	external := 0
	for _, tag := range tags {
		if !strings.Contains(tag, "://") {
			continue
		}
		external++
		if !pinned.MatchString(tag) {
			t.Errorf("%s: %s is not pinned to a release and a sha384 hash, with crossorigin", r.what, tag)
		}
	}
	if external != 2 {
		t.Errorf("%s: %d files from elsewhere, want 2 (the stylesheet and the script):\n%s", r.what, external, r.body)
	}
}

// TestUnparsableQueryNamesQuery checks the errors key openapi.json names
// for a query string that cannot be parsed at all.
func TestUnparsableQueryNamesQuery(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for _, q := range []string{"limit=%zz", "limit=1;x", "email=a%"} {
		mustInvalid(t, e.do("GET", "/users/?"+q, ""), "query")
	}
}

// authBody returns a body for POST /users/authenticate.
func authBody(email, password string) string {
	b, _ := json.Marshal(map[string]string{"email": email, "password": password})
	return string(b)
}

func (e *testEnv) authenticate(email, password string) response {
	e.t.Helper()
	return e.do("POST", "/users/authenticate", authBody(email, password))
}

// mustThrottled checks that r is a 429 that says to wait seconds.
func mustThrottled(t *testing.T, r response, seconds int) {
	t.Helper()
	mustError(t, r, http.StatusTooManyRequests, "Too many failed attempts")
	if got := r.header.Get("Retry-After"); got != strconv.Itoa(seconds) {
		t.Fatalf("%s: Retry-After = %q, want %d", r.what, got, seconds)
	}
}

func mustWrongCredentials(t *testing.T, r response) {
	t.Helper()
	mustError(t, r, http.StatusBadRequest, "Invalid email or password")
}

func TestAuthenticate(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	long := strings.Repeat("p", maxPasswordBytes)
	ann := e.createUser(t, "Ann", "Lee", "Ann@Example.com", "correct horse")
	bob := e.createUser(t, "Bob", "Ray", "bob@example.com", long)

	// The body of a success is the user, as GET shows it.
	r := e.do("POST", "/users/authenticate", `{"email":"  ANN@example.COM ","password":"correct horse"}`)
	if got := mustUser(t, r, http.StatusOK); got != ann {
		t.Errorf("%s: %+v, want %+v", r.what, got, ann)
	}
	if got := mustUser(t, e.authenticate("bob@example.com", long), http.StatusOK); got != bob {
		t.Errorf("72-byte password: %+v, want %+v", got, bob)
	}

	// A wrong password and an unknown email get one answer, byte for byte.
	wrong := e.authenticate("ann@example.com", "correct horse!")
	unknown := e.authenticate("nobody@example.com", "correct horse")
	mustWrongCredentials(t, wrong)
	mustWrongCredentials(t, unknown)
	for _, h := range []string{"Content-Type", "Content-Length", "Retry-After", "WWW-Authenticate"} {
		if wrong.header.Get(h) != unknown.header.Get(h) {
			t.Errorf("header %s: %q for a wrong password, %q for an unknown email", h, wrong.header.Get(h), unknown.header.Get(h))
		}
	}
	if string(wrong.body) != string(unknown.body) {
		t.Errorf("bodies differ: %s for a wrong password, %s for an unknown email", wrong.body, unknown.body)
	}
	// bcrypt reads 72 bytes; a longer password must not match through them.
	mustWrongCredentials(t, e.authenticate("bob@example.com", long+"x"))
	mustWrongCredentials(t, e.authenticate("ann@example.com", ""))
	mustWrongCredentials(t, e.authenticate("ann@example.com", "CORRECT HORSE"))
}

func TestAuthenticateBadBodies(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	for _, tt := range []struct{ name, body, field string }{
		{"empty body", "", "body"},
		{"not an object", `["ann@example.com","password1"]`, "body"},
		{"no email", `{"password":"password1"}`, "email"},
		{"no password", `{"email":"ann@example.com"}`, "password"},
		{"null password", `{"email":"ann@example.com","password":null}`, "password"},
		{"number password", `{"email":"ann@example.com","password":12345678}`, "password"},
		{"email not an address", `{"email":"ann","password":"password1"}`, "email"},
		{"email with a name", `{"email":"Ann <ann@example.com>","password":"password1"}`, "email"},
		{"email in another case", `{"Email":"ann@example.com","password":"password1"}`, "Email"},
		{"unknown field", `{"email":"ann@example.com","password":"password1","remember":true}`, "remember"},
		{"invalid UTF-8", `{"email":"ann@example.com","password":"pass` + "\xff" + `"}`, "body"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			mustInvalid(t, e.do("POST", "/users/authenticate", tt.body), tt.field)
		})
	}
	big := `{"email":"ann@example.com","password":"` + strings.Repeat("a", maxBodyBytes) + `"}`
	mustError(t, e.do("POST", "/users/authenticate", big), http.StatusRequestEntityTooLarge, "Request body too large")
	// None of them counted as a failure.
	var rows int
	if err := e.store.db.QueryRow(`SELECT count(*) FROM auth_failures`).Scan(&rows); err != nil || rows != 0 {
		t.Errorf("auth_failures holds %d rows (%v) after bad bodies, want 0", rows, err)
	}
}

func TestAuthenticateRouteAmongUserRoutes(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	// /users/{id} keeps every other method of /users/authenticate: it is
	// no user id, so not found, like /users/abc.
	for _, method := range []string{"GET", "PUT", "DELETE"} {
		body := ""
		if method == "PUT" {
			body = `{"first_name":"Bob"}`
		}
		mustError(t, e.do(method, "/users/authenticate", body), http.StatusNotFound, "User not found")
	}
	// And the user routes keep theirs.
	r := e.do("POST", fmt.Sprintf("/users/%d", u.ID), authBody("ann@example.com", "password1"))
	mustError(t, r, http.StatusMethodNotAllowed, "Method Not Allowed")
	if allow := r.header.Get("Allow"); allow != "DELETE, GET, HEAD, PUT" {
		t.Errorf("%s: Allow = %q", r.what, allow)
	}
	mustError(t, e.do("POST", "/users/authenticate/", authBody("ann@example.com", "password1")), http.StatusNotFound, "Not Found")
	mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK)
}

func TestAuthenticateThrottleSchedule(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	e := newTestEnv(t, withStore(newClockedStore(t, clock)))
	e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	// The wait after the 5th, 6th, ... consecutive failure, in seconds.
	waits := []int{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900}

	// An unknown address goes through every step exactly as a real one.
	for _, email := range []string{"ann@example.com", "nobody@example.com"} {
		t.Run(email, func(t *testing.T) {
			for i := 0; i < 5; i++ {
				mustWrongCredentials(t, e.authenticate(email, "wrong-password"))
			}
			for _, wait := range waits {
				// Early, even with the right password: told the whole
				// wait; and a moment before its end, 1 s (rounded up).
				mustThrottled(t, e.authenticate(email, "password1"), wait)
				clock.advance(time.Duration(wait)*time.Second - time.Millisecond)
				mustThrottled(t, e.authenticate(email, "wrong-password"), 1)
				// Those attempts neither counted nor moved the wait.
				clock.advance(time.Millisecond)
				mustWrongCredentials(t, e.authenticate(email, "wrong-password"))
			}
			mustThrottled(t, e.authenticate(email, "wrong-password"), 900)
			clock.advance(900 * time.Second)
			if email == "nobody@example.com" {
				mustWrongCredentials(t, e.authenticate(email, "password1"))
				return
			}
			// A success resets the count: five free failures again.
			mustUser(t, e.authenticate(email, "password1"), http.StatusOK)
			for i := 0; i < 5; i++ {
				mustWrongCredentials(t, e.authenticate(email, "wrong-password"))
			}
			mustThrottled(t, e.authenticate(email, "password1"), 1)
		})
	}
}

func TestAuthenticateThrottleIsSharedByReplicas(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	databaseURL, _ := newSchema(t)
	var replicas []*testEnv
	for i := 0; i < 2; i++ {
		st := newStoreAt(t, databaseURL)
		st.now = clock.now
		replicas = append(replicas, newTestEnv(t, withStore(st)))
	}
	a, b := replicas[0], replicas[1]
	a.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	for i := 0; i < 5; i++ {
		mustWrongCredentials(t, replicas[i%2].authenticate("ann@example.com", "wrong-password"))
	}
	mustThrottled(t, a.authenticate("ann@example.com", "password1"), 1)
	mustThrottled(t, b.authenticate("ann@example.com", "password1"), 1)
	clock.advance(time.Second)
	mustWrongCredentials(t, b.authenticate("ann@example.com", "wrong-password"))
	mustThrottled(t, a.authenticate("ann@example.com", "password1"), 2)
	clock.advance(2 * time.Second)
	mustUser(t, a.authenticate("ann@example.com", "password1"), http.StatusOK)
	// The success on one replica reset the count for both.
	for i := 0; i < 5; i++ {
		mustWrongCredentials(t, b.authenticate("ann@example.com", "wrong-password"))
	}
	mustThrottled(t, a.authenticate("ann@example.com", "wrong-password"), 1)
}

func TestConcurrentAuthenticateFailuresAreCounted(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	e := newTestEnv(t, withStore(newClockedStore(t, clock)))
	e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	const attempts = 20
	statuses := make(map[int]int)
	for _, r := range concurrently(attempts, func(int) response { return e.authenticate("ann@example.com", "wrong-password") }) {
		statuses[r.status]++
	}
	// Five free failures, however many come at once; the rest wait.
	if statuses[http.StatusBadRequest] != 5 || statuses[http.StatusTooManyRequests] != attempts-5 {
		t.Errorf("%d wrong passwords at once: statuses %v, want 5 × 400 and %d × 429", attempts, statuses, attempts-5)
	}
	if n := authFailures(t, e.store, "ann@example.com"); n != 5 {
		t.Errorf("failures stored = %d, want 5", n)
	}
}

func TestAuthenticateRehashesOnCostChange(t *testing.T) {
	t.Parallel()
	st := newTestStore(t)
	old := newTestEnv(t, withStore(st)) // hashes at bcrypt.MinCost
	u := old.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	hash, _ := old.storedSecret(t, u.ID)

	raised := newTestEnv(t, withStore(st), withHasher(newHasher(bcrypt.MinCost+1, 2, 10*time.Second)))
	// A failed check never rehashes.
	mustWrongCredentials(t, raised.authenticate("ann@example.com", "wrong-password"))
	if got, _ := raised.storedSecret(t, u.ID); got != hash {
		t.Fatalf("a failed check changed the stored hash")
	}
	if got := mustUser(t, raised.authenticate("ann@example.com", "password1"), http.StatusOK); got != u {
		t.Errorf("success: %+v, want %+v", got, u)
	}
	newHash, newSalt := raised.storedSecret(t, u.ID)
	if cost, err := bcrypt.Cost([]byte(newHash)); err != nil || cost != bcrypt.MinCost+1 || newHash == hash {
		t.Fatalf("after a success at the raised cost: hash %q (cost %d, %v), want a new hash at cost %d", newHash, cost, err, bcrypt.MinCost+1)
	}
	if newSalt != newHash[:bcryptSaltLen] {
		t.Errorf("stored salt %q is not the new hash's salt", newSalt)
	}
	// The new hash is for the same password, and the user looks the same.
	if got := mustUser(t, raised.authenticate("ann@example.com", "password1"), http.StatusOK); got != u {
		t.Errorf("after the rehash: %+v, want %+v (updated_at unchanged)", got, u)
	}
	if again, _ := raised.storedSecret(t, u.ID); again != newHash {
		t.Error("a success at the same cost rehashed again")
	}
}

func TestAuthenticateRehashLosesToAPasswordChange(t *testing.T) {
	t.Parallel()
	st := newTestStore(t)
	plain := newTestEnv(t, withStore(st))
	u := plain.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	// The raised hasher's rehash waits for release; meanwhile the password
	// changes.
	h, active, _, release := gatedHasher(1, time.Minute)
	h.cost = bcrypt.MinCost + 1
	raised := newTestEnv(t, withStore(st), withHasher(h))
	done := make(chan response, 1)
	go func() { done <- raised.authenticate("ann@example.com", "password1") }()
	deadline := time.Now().Add(10 * time.Second)
	for active.Load() < 1 {
		if time.Now().After(deadline) {
			close(release)
			t.Fatal("the rehash did not start within 10s")
		}
		time.Sleep(time.Millisecond)
	}
	mustUser(t, plain.do("PUT", fmt.Sprintf("/users/%d", u.ID), `{"password":"password2"}`), http.StatusOK)
	changed, _ := plain.storedSecret(t, u.ID)
	close(release)
	mustUser(t, <-done, http.StatusOK)
	if got, _ := plain.storedSecret(t, u.ID); got != changed {
		t.Fatalf("the rehash overwrote the password change")
	}
	mustUser(t, plain.authenticate("ann@example.com", "password2"), http.StatusOK)
	mustWrongCredentials(t, plain.authenticate("ann@example.com", "password1"))
}

func TestAuthenticateNeedsTheToken(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withToken("tok-1"))
	mustUser(t, e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "password1"), "Authorization: Bearer tok-1"), http.StatusCreated)
	for _, auth := range []string{"", "Bearer wrong"} {
		r := e.do("POST", "/users/authenticate", authBody("ann@example.com", "password1"), "Authorization: "+auth)
		mustError(t, r, http.StatusUnauthorized, "Not authenticated")
	}
	if n := authFailures(t, e.store, "ann@example.com"); n != -1 {
		t.Errorf("requests without the token counted %d failures, want none", n)
	}
	mustUser(t, e.do("POST", "/users/authenticate", authBody("ann@example.com", "password1"), "Authorization: Bearer tok-1"), http.StatusOK)
}

func TestAuthenticateWhenHashingIsBusy(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	h, active, _, release := gatedHasher(1, 50*time.Millisecond)
	e := newTestEnv(t, withStore(newClockedStore(t, clock)), withHasher(h))
	for i := 0; i < 5; i++ {
		countAuthFailure(t, e.store, "bob@example.com")
	}
	first := make(chan response, 1)
	go func() { first <- e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "password1")) }()
	for active.Load() < 1 {
		time.Sleep(time.Millisecond)
	}
	// The one hashing slot is taken: a check gets 503 and counts nothing.
	r := e.authenticate("carol@example.com", "password1")
	mustError(t, r, http.StatusServiceUnavailable, "Service unavailable")
	if r.header.Get("Retry-After") == "" {
		t.Errorf("%s: no Retry-After", r.what)
	}
	if n := authFailures(t, e.store, "carol@example.com"); n != -1 {
		t.Errorf("a 503 counted %d failures, want none", n)
	}
	// An early attempt needs no hashing slot: it gets its 429 meanwhile.
	mustThrottled(t, e.authenticate("bob@example.com", "password1"), 1)
	close(release)
	mustUser(t, <-first, http.StatusCreated)
	mustUser(t, e.authenticate("ann@example.com", "password1"), http.StatusOK)
}

func TestAuthenticateLogsNoPassword(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	e := newTestEnv(t, withStore(newClockedStore(t, clock)))
	const password, wrong = "first-Secret-pw", "wrong-Secret-pw"
	e.createUser(t, "Ann", "Lee", "ann@example.com", password)
	mustUser(t, e.authenticate("ann@example.com", password), http.StatusOK)
	for i := 0; i < 5; i++ {
		mustWrongCredentials(t, e.authenticate("ann@example.com", wrong))
	}
	mustThrottled(t, e.authenticate("ann@example.com", wrong), 1)
	mustInvalid(t, e.do("POST", "/users/authenticate", `{"email":"bad","password":"`+wrong+`"}`), "email")
	// Failures that are logged in full: the tables are broken.
	if _, err := e.store.db.Exec(`ALTER TABLE users RENAME COLUMN password TO pw`); err != nil {
		t.Fatal(err)
	}
	clock.advance(time.Second)
	mustError(t, e.authenticate("ann@example.com", wrong), http.StatusInternalServerError, "Internal server error")
	if _, err := e.store.db.Exec(`ALTER TABLE auth_failures RENAME TO gone`); err != nil {
		t.Fatal(err)
	}
	mustError(t, e.authenticate("ann@example.com", password), http.StatusInternalServerError, "Internal server error")

	logs := e.logs.String()
	if strings.Count(logs, "internal error") != 2 {
		t.Fatalf("the failures were not logged:\n%s", logs)
	}
	for _, secret := range []string{password, wrong, "Secret"} {
		if strings.Contains(logs, secret) {
			t.Errorf("the log contains the password %q:\n%s", secret, logs)
		}
	}
}

// median returns the middle of ds, which it sorts.
func median(ds []time.Duration) time.Duration {
	slices.Sort(ds)
	return ds[len(ds)/2]
}

// authTimings times rounds of failed checks at a bcrypt cost: a wrong
// password, an unknown email, and a password over 72 bytes, one after
// another in each round, in an order that turns so that none gets the warmer
// turn. It returns each one's median time, and the medians of the ratios,
// round by round, of the second and third to the first: ratios of checks
// made moments apart are steadier than ratios of medians on a machine whose
// load comes and goes.
func authTimings(t testing.TB, cost, rounds int) (medians [3]time.Duration, ratios [2]float64) {
	clock := newTestClock()
	st := newTestStore(t)
	st.now = clock.now
	e := newTestEnv(t, withStore(st), withHasher(newHasher(cost, 2, time.Minute)))
	mustStatus := func(r response, status int) {
		if r.status != status {
			t.Fatalf("%s, want %d", r, status)
		}
	}
	mustStatus(e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "password1")), http.StatusCreated)
	checks := []struct{ email, password string }{
		{"ann@example.com", "wrong-password"},
		{"nobody@example.com", "wrong-password"},
		{"ann@example.com", strings.Repeat("password1", 9)},
	}
	var times [3][]time.Duration
	var rs [2][]float64
	for i := 0; i < rounds; i++ {
		clock.advance(24 * time.Hour) // every count forgotten: no 429
		var round [3]time.Duration
		for j := range checks {
			k := (i + j) % len(checks)
			start := time.Now()
			r := e.authenticate(checks[k].email, checks[k].password)
			round[k] = time.Since(start)
			mustStatus(r, http.StatusBadRequest)
			times[k] = append(times[k], round[k])
		}
		rs[0] = append(rs[0], float64(round[1])/float64(round[0]))
		rs[1] = append(rs[1], float64(round[2])/float64(round[0]))
	}
	for k := range times {
		medians[k] = median(times[k])
	}
	for k := range rs {
		slices.Sort(rs[k])
		ratios[k] = rs[k][len(rs[k])/2]
	}
	return medians, ratios
}

// costTaking returns the lowest bcrypt cost, up to 12, at which one hash
// takes at least d here, as built: the race detector makes bcrypt some
// twenty times slower.
func costTaking(d time.Duration) int {
	for cost := bcrypt.MinCost; cost < 12; cost++ {
		start := time.Now()
		bcrypt.GenerateFromPassword([]byte("password1"), cost)
		if time.Since(start) >= d {
			return cost
		}
	}
	return 12
}

func TestAuthenticateTakesAsLongForUnknownEmails(t *testing.T) {
	t.Parallel()
	// At this cost a comparison takes far longer than the rest of a
	// request: a check that skipped it would take a small fraction of the
	// time. The bounds are loose, since other tests share the CPU.
	cost := costTaking(20 * time.Millisecond)
	medians, ratios := authTimings(t, cost, 15)
	t.Logf("cost %d, medians: wrong password %v, unknown email %v, password over 72 bytes %v; median ratios to a wrong password: %.2f, %.2f",
		cost, medians[0], medians[1], medians[2], ratios[0], ratios[1])
	for i, what := range []string{"an unknown email", "a password over 72 bytes"} {
		if ratios[i] < 1.0/3 || ratios[i] > 3 {
			t.Errorf("%s takes %.2f times as long as a wrong password, want about 1", what, ratios[i])
		}
	}
}

func TestEvery503CarriesRetryAfter(t *testing.T) {
	t.Parallel()
	proxy, databaseURL := newDBProxy(t)
	st, err := openStore(context.Background(), databaseURL, testPool, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e := newTestEnv(t, withStore(st))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	proxy.cut()
	for _, rq := range everyUsersRoute(u.ID) {
		mustRetryLater(t, e.do(rq.method, rq.path, rq.body))
	}
	mustRetryLater(t, e.do("GET", "/healthz", ""))
}

func TestClientThatLeftGetsNoSuccess(t *testing.T) {
	t.Parallel()
	h := newHasher(bcrypt.MinCost, 1, time.Minute)
	e := newTestEnv(t, withHasher(h))
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	// Every hashing slot is taken: a request waits until its client leaves.
	h.slots <- struct{}{}
	for _, rq := range []struct{ method, path, body string }{
		{"POST", "/users", userBody("Bob", "Ray", "bob@example.com", "password1")},
		{"PUT", fmt.Sprintf("/users/%d", u.ID), `{"password":"password2","first_name":"Changed"}`},
	} {
		conn, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		// A whole request, then the client closes its side: it will read
		// no more than what is already on its way.
		fmt.Fprintf(conn, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
			rq.method, rq.path, len(rq.body), rq.body)
		conn.(*net.TCPConn).CloseWrite()
		conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		got, err := io.ReadAll(conn)
		if os.IsTimeout(err) {
			t.Fatalf("%s %s: no answer and no close within 20s", rq.method, rq.path)
		}
		if bytes.HasPrefix(got, []byte("HTTP/1.1 2")) {
			t.Errorf("%s %s from a client that left: %q, want no success for work not done", rq.method, rq.path, got)
		}
	}
	<-h.slots
	if n := countUsers(t, e.store); n != 1 {
		t.Errorf("%d users stored, want only the first", n)
	}
	if got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK); got != u {
		t.Errorf("after the PUT of a client that left: %+v, want %+v", got, u)
	}
}

// A request that declares a body the handler does not read is answered and
// its connection closed at once: net/http would otherwise wait for the body,
// up to the 16 s ReadTimeout, holding a MAX_CLIENTS place for a client that
// never sends it.
func TestUnreadBodyClosesTheConnection(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withToken("s3cret"))
	host := strings.TrimPrefix(e.url, "http://")
	for _, request := range []string{
		"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n\r\n",
		"POST /users/ HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n", // 401
	} {
		conn, err := net.Dial("tcp", host)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := io.WriteString(conn, request); err != nil {
			t.Fatal(err)
		}
		// Well within the ReadTimeout, which the old behaviour waits out.
		conn.SetReadDeadline(time.Now().Add(8 * time.Second))
		got, err := io.ReadAll(conn)
		if err != nil {
			t.Errorf("%q: connection still open after the answer %q: %v", request, got, err)
		}
		if !bytes.HasPrefix(got, []byte("HTTP/1.1 ")) {
			t.Errorf("%q: answer %q, want an HTTP answer", request, got)
		}
	}
}

func TestHostileStrings(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	literal := []struct{ name, field, value string }{
		{"SQL in a name", "last_name", `Robert'); DROP TABLE users;--`},
		{"SQL in an email", "email", `o'brien--@example.com`},
		{"quotes and backslashes", "first_name", `"Ann" \ 'Lee' \n`},
		{"right-to-left override in a name", "first_name", "\u202eeciffo"},
		{"zero-width space in a name", "last_name", "Le\u200be"},
		{"emoji with zero-width joiners", "first_name", "👩‍💻"},
		{"mixed scripts", "last_name", "Łukasz ابن O'Neil-Ñúñez"},
		{"non-ASCII email", "email", "zoë@example.com"},
	}
	for i, tt := range literal {
		t.Run(tt.name, func(t *testing.T) {
			fields := map[string]string{"first_name": "Ann", "last_name": "Lee", "email": fmt.Sprintf("h%d@example.com", i), "password": "password1"}
			fields[tt.field] = tt.value
			u := e.createUser(t, fields["first_name"], fields["last_name"], fields["email"], fields["password"])
			got := mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusOK)
			stored := map[string]string{"first_name": got.FirstName, "last_name": got.LastName, "email": got.Email}
			if v, ok := stored[tt.field]; ok && v != strings.ToLower(strings.TrimSpace(tt.value)) && v != strings.TrimSpace(tt.value) {
				t.Errorf("%s stored as %q, want %q literally", tt.field, v, tt.value)
			}
		})
	}
	if n := countUsers(t, e.store); n != len(literal) {
		t.Fatalf("%d users stored, want %d: the table took damage", n, len(literal))
	}

	rejected := []struct{ name, body, field string }{
		{"NUL in a name", `{"first_name":"Ann\u0000","last_name":"Lee","email":"n@example.com","password":"password1"}`, "first_name"},
		{"NUL in a password", `{"first_name":"Ann","last_name":"Lee","email":"n@example.com","password":"pass\u0000word"}`, "password"},
		{"NUL in an email", `{"first_name":"Ann","last_name":"Lee","email":"n\u0000@example.com","password":"password1"}`, "email"},
		{"unpaired surrogate in a name", `{"first_name":"Ann\ud800","last_name":"Lee","email":"n@example.com","password":"password1"}`, "first_name"},
		{"raw invalid UTF-8", "{\"first_name\":\"Ann\xc3\x28\",\"last_name\":\"Lee\",\"email\":\"n@example.com\",\"password\":\"password1\"}", "body"},
		{"overlong UTF-8 NUL", "{\"first_name\":\"Ann\xc0\x80\",\"last_name\":\"Lee\",\"email\":\"n@example.com\",\"password\":\"password1\"}", "body"},
		{"right-to-left override in an email", `{"first_name":"Ann","last_name":"Lee","email":"\u202en@example.com","password":"password1"}`, "email"},
		{"zero-width space in an email", `{"first_name":"Ann","last_name":"Lee","email":"n\u200b@example.com","password":"password1"}`, "email"},
		{"10,000-character email", `{"first_name":"Ann","last_name":"Lee","email":"` + strings.Repeat("a", 10000) + `@example.com","password":"password1"}`, "email"},
		{"10,000-character name", `{"first_name":"` + strings.Repeat("a", 10000) + `","last_name":"Lee","email":"n@example.com","password":"password1"}`, "first_name"},
		{"10,000-character password", `{"first_name":"Ann","last_name":"Lee","email":"n@example.com","password":"` + strings.Repeat("a", 10000) + `"}`, "password"},
		{"deeply nested JSON", `{"first_name":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + `}`, "first_name"},
	}
	for _, tt := range rejected {
		t.Run(tt.name, func(t *testing.T) {
			mustInvalid(t, e.do("POST", "/users/", tt.body), tt.field)
			mustInvalid(t, e.do("PUT", "/users/1", strings.Replace(tt.body, `"email":"n@example.com",`, "", 1)), tt.field)
		})
	}
	if n := countUsers(t, e.store); n != len(literal) {
		t.Errorf("%d users stored after rejected input, want %d", n, len(literal))
	}
}

func TestNoSecretsInLogs(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	const password, newPassword = "first-Secret-pw", "second-Secret-pw"
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", password)
	hash1, salt1 := e.storedSecret(t, u.ID)
	path := fmt.Sprintf("/users/%d", u.ID)
	mustUser(t, e.do("PUT", path, `{"password":"`+newPassword+`"}`), http.StatusOK)
	hash2, salt2 := e.storedSecret(t, u.ID)
	mustError(t, e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", password)), http.StatusBadRequest, "Email already registered")
	mustInvalid(t, e.do("POST", "/users/", userBody("Ann", "Lee", "not-an-email", password)), "email")
	mustInvalid(t, e.do("PUT", path, `{"password":"`+password+`","email":"bad"}`), "email")
	mustError(t, e.do("PUT", "/users/999999", `{"password":"`+password+`"}`), http.StatusNotFound, "User not found")
	// And a failure that is logged in full: the table is broken.
	e.store.db.Exec(`ALTER TABLE users RENAME COLUMN password TO pw`)
	mustError(t, e.do("POST", "/users/", userBody("Bob", "Ray", "bob@example.com", password)), http.StatusInternalServerError, "Internal server error")
	mustError(t, e.do("PUT", path, `{"password":"`+newPassword+`"}`), http.StatusInternalServerError, "Internal server error")

	logs := e.logs.String()
	if !strings.Contains(logs, "internal error") {
		t.Fatalf("the failures were not logged:\n%s", logs)
	}
	for _, secret := range []string{password, newPassword, hash1, salt1, hash2, salt2, salt1[7:], salt2[7:]} {
		if strings.Contains(logs, secret) {
			t.Errorf("the log contains the secret %q:\n%s", secret, logs)
		}
	}
}

func TestSecurityHeadersOnEveryAnswer(t *testing.T) {
	t.Parallel()
	// testEnv.do checks Cache-Control and X-Content-Type-Options on every
	// answer of every test; this one makes sure each kind of answer passes.
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	for _, rq := range []struct{ method, path, body string }{
		{"GET", "/users/", ""}, {"GET", fmt.Sprintf("/users/%d", u.ID), ""}, {"GET", "/users/x", ""},
		{"POST", "/users/", "{"}, {"PATCH", "/users/1", ""}, {"GET", "/nope", ""}, {"GET", "/healthz", ""},
		{"DELETE", fmt.Sprintf("/users/%d", u.ID), ""},
	} {
		r := e.do(rq.method, rq.path, rq.body)
		if r.header.Get("Cache-Control") != "no-store" || r.header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s: headers %v lack no-store or nosniff", r, r.header)
		}
	}
}

func TestTruncatedBodyTimesOutWithoutAConnection(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withServer(func(s *http.Server) { s.ReadTimeout = 300 * time.Millisecond }))
	conn, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "POST /users/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"first_name\":\"Ann\",")
	time.Sleep(100 * time.Millisecond)
	if inUse := e.store.db.Stats().InUse; inUse != 0 {
		t.Errorf("%d database connections in use while the body is still coming", inUse)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("a truncated body got %d, want 400 or a closed connection", resp.StatusCode)
		}
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the server still waits for the body after 5s")
	}
	if n := countUsers(t, e.store); n != 0 {
		t.Errorf("%d users stored from a truncated body", n)
	}
}

func TestAPIToken(t *testing.T) {
	t.Parallel()
	const token = "tok-3f9a"
	e := newTestEnv(t, withToken(token))
	requests := []struct{ method, path, body string }{
		{"POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "password1")},
		{"POST", "/users", userBody("Ann", "Lee", "ann@example.com", "password1")},
		{"GET", "/users/", ""},
		{"GET", "/users", ""},
		{"GET", "/users/1", ""},
		{"PUT", "/users/1", `{"first_name":"Bob"}`},
		{"DELETE", "/users/1", ""},
	}
	for _, auth := range []string{"", "Bearer", "Bearer ", "Bearer wrong", "Bearer " + token + "x", "Basic " + token, token, "Bearer  " + token} {
		for _, rq := range requests {
			var header []string
			if auth != "" {
				header = []string{"Authorization: " + auth}
			}
			r := e.do(rq.method, rq.path, rq.body, header...)
			mustError(t, r, http.StatusUnauthorized, "Not authenticated")
			if got := r.header.Get("WWW-Authenticate"); got != "Bearer" {
				t.Errorf("%s with %q: WWW-Authenticate = %q, want Bearer", r.what, auth, got)
			}
		}
	}
	if n := countUsers(t, e.store); n != 0 {
		t.Fatalf("%d users created without the token", n)
	}

	u := mustUser(t, e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "password1"), "Authorization: Bearer "+token), http.StatusCreated)
	mustUser(t, e.do("GET", fmt.Sprintf("/users/%d", u.ID), "", "Authorization: bearer "+token), http.StatusOK)
	if r := e.do("GET", "/healthz", ""); r.status != http.StatusOK {
		t.Errorf("%s without a token, want 200: /healthz stays open", r)
	}
}

func countUsers(t *testing.T, st *store) int {
	t.Helper()
	var n int
	if err := st.db.QueryRow(`SELECT count(*) FROM users`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestHashingBusyAnswers503(t *testing.T) {
	t.Parallel()
	h, active, _, release := gatedHasher(1, 50*time.Millisecond)
	e := newTestEnv(t, withHasher(h))
	first := make(chan response, 1)
	go func() { first <- e.do("POST", "/users/", userBody("Ann", "Lee", "ann@example.com", "password1")) }()
	for active.Load() < 1 {
		time.Sleep(time.Millisecond)
	}
	for _, rq := range []struct{ method, path, body string }{
		{"POST", "/users/", userBody("Bob", "Ray", "bob@example.com", "password1")},
		{"PUT", "/users/1", `{"password":"password2"}`},
	} {
		r := e.do(rq.method, rq.path, rq.body)
		mustError(t, r, http.StatusServiceUnavailable, "Service unavailable")
		if r.header.Get("Retry-After") == "" {
			t.Errorf("%s: no Retry-After", r.what)
		}
	}
	// Requests that need no hash are served meanwhile.
	mustError(t, e.do("GET", "/users/", ""), http.StatusNotFound, "No users found")
	close(release)
	mustUser(t, <-first, http.StatusCreated)
	if n := countUsers(t, e.store); n != 1 {
		t.Errorf("%d users stored, want only the first", n)
	}
}

func TestInternalErrorsAreGeneric(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	u := e.createUser(t, "Ann", "Lee", "ann@example.com", "password1")
	// A fault on the server's side: the table is not what the code expects.
	if _, err := e.store.db.Exec(`ALTER TABLE users RENAME COLUMN first_name TO given_name`); err != nil {
		t.Fatal(err)
	}
	for _, rq := range everyUsersRoute(u.ID) {
		if rq.method == "DELETE" {
			continue // DELETE does not read the renamed column
		}
		r := e.do(rq.method, rq.path, rq.body)
		mustError(t, r, http.StatusInternalServerError, "Internal server error")
		if strings.Contains(string(r.body), "first_name") || strings.Contains(string(r.body), "pq") {
			t.Errorf("%s: the answer leaks the cause: %s", r.what, r.body)
		}
	}
	if _, err := e.store.db.Exec(`ALTER TABLE users RENAME TO gone`); err != nil {
		t.Fatal(err)
	}
	mustError(t, e.do("DELETE", fmt.Sprintf("/users/%d", u.ID), ""), http.StatusInternalServerError, "Internal server error")
	logs := e.logs.String()
	if !strings.Contains(logs, `level=ERROR msg="internal error" method=PUT path=/users/`) || !strings.Contains(logs, "given_name") && !strings.Contains(logs, "first_name") {
		t.Errorf("the log does not hold the cause with its request:\n%s", logs)
	}
	if strings.Contains(logs, "password1") {
		t.Errorf("the log holds a password:\n%s", logs)
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
		w.(http.Flusher).Flush()
		panic("failed mid-stream")
	})
	mux.HandleFunc("GET /ok", func(w http.ResponseWriter, _ *http.Request) {
		encode(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	srv := newTestHTTPServer(t, s.wrap(mux))
	e := &testEnv{t: t, url: srv}

	mustError(t, e.do("GET", "/panic", ""), http.StatusInternalServerError, "Internal server error")
	if r := e.do("GET", "/ok", ""); r.status != http.StatusOK {
		t.Errorf("%s after a panic, want 200: the process keeps serving", r)
	}
	// A panic after the answer started cannot change the status: the
	// connection is cut so the client sees a broken response.
	resp, err := http.Get(srv + "/half")
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Errorf("GET /half: the client got a complete response from a handler that panicked mid-stream")
	}
	out := logs.String()
	for _, want := range []string{`msg=panic method=GET pattern="GET /panic" panic="handler bug" stack=`, "users_test.go", `pattern="GET /panic" status=500`, `panic="failed mid-stream"`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

// The API description, kept true to the routes and to every answer.

// openapi.json is written by hand. These tests keep it true to the code:
//
//   - its paths and methods are exactly the route table, routes();
//   - every answer a test gets through testEnv.do is checked against it
//     (status, headers, body), and after a full passing run TestMain fails
//     if it documents a status that no test produced.

// apiSpec is openapi.json, decoded.
type apiSpec struct{ root map[string]any }

// loadSpec decodes the openapi.json the service embeds, once.
var loadSpec = sync.OnceValues(func() (*apiSpec, error) {
	var root map[string]any
	if err := json.Unmarshal(openAPI, &root); err != nil {
		return nil, fmt.Errorf("openapi.json: %w", err)
	}
	return &apiSpec{root}, nil
})

// operationMethods are the keys of an OpenAPI path item that are operations.
var operationMethods = []string{"get", "put", "post", "delete", "options", "head", "patch", "trace"}

// routeKey turns a mux pattern's path or an OpenAPI path into one form, so
// that the two can be compared: "/users/{$}" is the OpenAPI path "/users/",
// and every wildcard or path parameter becomes "{}" whatever its name.
func routeKey(path string) string {
	return wildcard.ReplaceAllString(strings.TrimSuffix(path, "{$}"), "{}")
}

var wildcard = regexp.MustCompile(`\{[^}/]*\}`)

// operations returns the description's operations as "METHOD path" with
// the OpenAPI path, keyed by "METHOD routeKey(path)".
func (s *apiSpec) operations() map[string]string {
	ops := make(map[string]string)
	paths, _ := s.root["paths"].(map[string]any)
	for path, item := range paths {
		item, _ := item.(map[string]any)
		for _, m := range operationMethods {
			if _, ok := item[m]; ok {
				ops[strings.ToUpper(m)+" "+routeKey(path)] = strings.ToUpper(m) + " " + path
			}
		}
	}
	return ops
}

// resolve follows a "$ref" to a local component, if node is one.
func (s *apiSpec) resolve(node map[string]any) (map[string]any, error) {
	for i := 0; i < 10; i++ {
		ref, ok := node["$ref"].(string)
		if !ok {
			return node, nil
		}
		if !strings.HasPrefix(ref, "#/") {
			return nil, fmt.Errorf("$ref %q is not local", ref)
		}
		var cur any = s.root
		for _, name := range strings.Split(ref[2:], "/") {
			name = strings.NewReplacer("~1", "/", "~0", "~").Replace(name)
			m, _ := cur.(map[string]any)
			cur = m[name]
		}
		next, ok := cur.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("$ref %q leads nowhere", ref)
		}
		node = next
	}
	return nil, fmt.Errorf("$ref loop at %v", node["$ref"])
}

// response returns what the description says about one answer of a route,
// given as the mux pattern's method and path.
func (s *apiSpec) response(method, pattern string, status int) (map[string]any, error) {
	op, ok := s.operations()[method+" "+routeKey(pattern)]
	if !ok {
		return nil, fmt.Errorf("openapi.json has no operation for %s %s", method, pattern)
	}
	_, path, _ := strings.Cut(op, " ")
	item := s.root["paths"].(map[string]any)[path].(map[string]any)
	operation, _ := item[strings.ToLower(method)].(map[string]any)
	responses, _ := operation["responses"].(map[string]any)
	resp, ok := responses[strconv.Itoa(status)].(map[string]any)
	if !ok {
		return nil, fmt.Errorf("openapi.json documents no %d for %s %s", status, method, path)
	}
	return s.resolve(resp)
}

// checkAnswer reports where an answer differs from the description's
// response: a required header missing, a header or the body not matching
// its schema, a body where none is described or the other way round.
func (s *apiSpec) checkAnswer(desc map[string]any, r response) []string {
	var problems []string
	headers, _ := desc["headers"].(map[string]any)
	for name, h := range headers {
		h, err := s.resolve(h.(map[string]any))
		if err != nil {
			problems = append(problems, fmt.Sprintf("header %s: %v", name, err))
			continue
		}
		value := r.header.Get(name)
		if value == "" {
			if h["required"] == true {
				problems = append(problems, "no "+name+" header")
			}
			continue
		}
		schema, _ := h["schema"].(map[string]any)
		// A header is text; read it as the number its schema wants, if so.
		var v any = value
		if t, _ := schema["type"].(string); t == "integer" || t == "number" {
			v = json.Number(value)
			if _, err := strconv.ParseFloat(value, 64); err != nil {
				v = value // and let the check say it is not a number
			}
		}
		problems = append(problems, s.checkValue(schema, v, "header "+name)...)
	}

	content, _ := desc["content"].(map[string]any)
	if len(content) == 0 {
		if len(r.body) > 0 {
			problems = append(problems, "a body where openapi.json describes none")
		}
		return problems
	}
	mediaType, _, _ := mime.ParseMediaType(r.header.Get("Content-Type"))
	media, ok := content[mediaType].(map[string]any)
	if !ok {
		return append(problems, fmt.Sprintf("Content-Type %q is not among those described", r.header.Get("Content-Type")))
	}
	if mediaType != "application/json" {
		return problems
	}
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.UseNumber()
	var body any
	if err := dec.Decode(&body); err != nil {
		return append(problems, fmt.Sprintf("body is not JSON: %v", err))
	}
	if _, err := dec.Token(); err != io.EOF {
		problems = append(problems, "body has more than one JSON value")
	}
	schema, _ := media["schema"].(map[string]any)
	return append(problems, s.checkValue(schema, body, "body")...)
}

// checkValue reports where v, decoded with UseNumber, does not match schema.
// It knows the part of JSON Schema that openapi.json uses, and is stricter
// in one way: an object's keys must be declared, in properties or by
// additionalProperties, since the description must name every field the
// service sends.
func (s *apiSpec) checkValue(schema map[string]any, v any, at string) []string {
	schema, err := s.resolve(schema)
	if err != nil {
		return []string{at + ": " + err.Error()}
	}
	if schema == nil {
		return []string{at + ": no schema"}
	}
	if !typeAllowed(schema["type"], v) {
		return []string{fmt.Sprintf("%s: %s, want type %v", at, jsonType(v), schema["type"])}
	}
	var problems []string
	fail := func(format string, args ...any) {
		problems = append(problems, at+": "+fmt.Sprintf(format, args...))
	}
	if c, ok := schema["const"]; ok && fmt.Sprint(c) != fmt.Sprint(v) {
		fail("%v, want %v", v, c)
	}
	switch v := v.(type) {
	case string:
		n := utf8.RuneCountInString(v)
		if min, ok := schema["minLength"].(float64); ok && float64(n) < min {
			fail("%d characters, want at least %v", n, min)
		}
		if max, ok := schema["maxLength"].(float64); ok && float64(n) > max {
			fail("%d characters, want at most %v", n, max)
		}
		if p, ok := schema["pattern"].(string); ok && !regexp.MustCompile(p).MatchString(v) {
			fail("%q does not match %s", v, p)
		}
		if f, ok := schema["format"].(string); ok && !formatValid(f, v) {
			fail("%q is not a %s", v, f)
		}
	case json.Number:
		n, _ := v.Float64()
		if min, ok := schema["minimum"].(float64); ok && n < min {
			fail("%v, want at least %v", v, min)
		}
		if max, ok := schema["maximum"].(float64); ok && n > max {
			fail("%v, want at most %v", v, max)
		}
		if schema["format"] == "int64" {
			if _, err := strconv.ParseInt(string(v), 10, 64); err != nil {
				fail("%v is not an int64", v)
			}
		}
	case []any:
		items, _ := schema["items"].(map[string]any)
		for i, item := range v {
			problems = append(problems, s.checkValue(items, item, fmt.Sprintf("%s[%d]", at, i))...)
		}
	case map[string]any:
		required, _ := schema["required"].([]any)
		for _, name := range required {
			if _, ok := v[name.(string)]; !ok {
				fail("no %q", name)
			}
		}
		properties, _ := schema["properties"].(map[string]any)
		for name, value := range v {
			sub, declared := properties[name].(map[string]any)
			if !declared {
				switch extra := schema["additionalProperties"].(type) {
				case map[string]any:
					sub, declared = extra, true
				case bool:
					if extra {
						continue // any key, any value
					}
				}
			}
			if !declared {
				fail("%q is not in openapi.json", name)
				continue
			}
			problems = append(problems, s.checkValue(sub, value, at+"."+name)...)
		}
	}
	return problems
}

// jsonType returns the JSON Schema type of a value decoded with UseNumber.
func jsonType(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case json.Number:
		if strings.ContainsAny(string(v), ".eE") {
			return "number"
		}
		return "integer"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}

// typeAllowed reports whether v is of the schema's type: one name, a list
// of them, or none for any type.
func typeAllowed(types any, v any) bool {
	got := jsonType(v)
	var names []any
	switch t := types.(type) {
	case nil:
		return true
	case string:
		names = []any{t}
	case []any:
		names = t
	}
	for _, name := range names {
		if name == got || (name == "number" && got == "integer") {
			return true
		}
	}
	return false
}

// formatValid reports whether s is in the format a schema names; formats
// it does not know pass.
func formatValid(format, s string) bool {
	switch format {
	case "date-time":
		_, err := time.Parse(time.RFC3339Nano, s)
		return err == nil
	case "email", "idn-email":
		addr, err := mail.ParseAddress(s)
		return err == nil && addr.Address == s
	case "uri-reference":
		_, err := url.Parse(s)
		return err == nil
	}
	return true
}

// answer is one (route, status) that the service answered a test with; the
// route is as routes() registers it.
type answer struct {
	method, pattern string
	status          int
}

func (a answer) String() string { return fmt.Sprintf("%s %s %d", a.method, a.pattern, a.status) }

// answered holds every answer the tests got through testEnv.do.
var answered = struct {
	sync.Mutex
	set map[answer]bool
}{set: make(map[answer]bool)}

// routeMux matches a request to its pattern in routes(), as the server's
// own mux does.
var routeMux = sync.OnceValue(func() *http.ServeMux {
	mux := http.NewServeMux()
	for _, rt := range (&server{}).routes() {
		mux.Handle(rt.method+" "+rt.pattern, http.NotFoundHandler())
	}
	return mux
})

// checkAnswer records which route answered req and with what status, and
// fails the test if openapi.json does not describe that answer. testEnv.do
// calls it for every request.
func (e *testEnv) checkAnswer(req *http.Request, r response) {
	e.t.Helper()
	if req.Method == http.MethodHead {
		return // served by the GET route, and not in openapi.json
	}
	_, pattern := routeMux().Handler(req)
	if pattern == "" || !isCleanPath(req.URL.EscapedPath()) {
		return // no route: the mux's own 404 or 405, or an unclean path's 404
	}
	method, path, _ := strings.Cut(pattern, " ")
	answered.Lock()
	answered.set[answer{method, path, r.status}] = true
	answered.Unlock()

	spec, err := loadSpec()
	if err != nil {
		e.t.Errorf("%s: %v", r.what, err)
		return
	}
	desc, err := spec.response(method, path, r.status)
	if err != nil {
		e.t.Errorf("%s: %v; answer: %.300s", r.what, err, r.body)
		return
	}
	for _, p := range spec.checkAnswer(desc, r) {
		e.t.Errorf("%s: %d answer differs from openapi.json: %s", r.what, r.status, p)
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

// checkAnswersDocumented compares the answers the tests got with those
// openapi.json documents, both ways, and writes each difference to w. It
// returns false if there is any. TestMain calls it after a full run that
// passed, when the tests have produced every answer they will.
func checkAnswersDocumented(w io.Writer) bool {
	spec, err := loadSpec()
	if err != nil {
		fmt.Fprintln(w, err)
		return false
	}
	// Which route each of the description's paths is.
	patterns := make(map[string]string) // routeKey(path) -> mux pattern's path
	for _, rt := range (&server{}).routes() {
		patterns[routeKey(rt.pattern)] = rt.pattern
	}
	documented := make(map[answer]bool)
	paths, _ := spec.root["paths"].(map[string]any)
	for path, item := range paths {
		pattern, ok := patterns[routeKey(path)]
		if !ok {
			continue // TestOpenAPIDescribesEveryRoute reports it
		}
		for _, m := range operationMethods {
			op, _ := item.(map[string]any)[m].(map[string]any)
			responses, _ := op["responses"].(map[string]any)
			for code := range responses {
				status, err := strconv.Atoi(code)
				if err != nil {
					fmt.Fprintf(w, "openapi.json: %s %s: response %q: only exact statuses can be checked\n", strings.ToUpper(m), path, code)
					return false
				}
				documented[answer{strings.ToUpper(m), pattern, status}] = true
			}
		}
	}

	answered.Lock()
	defer answered.Unlock()
	var unproduced, undocumented []string
	for a := range documented {
		if !answered.set[a] {
			unproduced = append(unproduced, a.String())
		}
	}
	for a := range answered.set {
		if !documented[a] {
			undocumented = append(undocumented, a.String())
		}
	}
	report := func(list []string, heading string) {
		if len(list) == 0 {
			return
		}
		sort.Strings(list)
		fmt.Fprintf(w, "FAIL: %s:\n\t%s\n", heading, strings.Join(list, "\n\t"))
	}
	report(unproduced, "openapi.json documents answers that no test produced; add a test that produces each, or take it out of openapi.json if the code cannot answer it")
	report(undocumented, "tests got answers that openapi.json does not document; add each to openapi.json")
	return len(unproduced) == 0 && len(undocumented) == 0
}

func TestOpenAPIDescribesEveryRoute(t *testing.T) {
	t.Parallel()
	spec, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	described := spec.operations()
	served := make(map[string]bool)
	for _, rt := range (&server{}).routes() {
		key := rt.method + " " + routeKey(rt.pattern)
		served[key] = true
		if _, ok := described[key]; !ok {
			t.Errorf("route %s %s is not in openapi.json", rt.method, rt.pattern)
		}
	}
	for key, op := range described {
		if !served[key] {
			t.Errorf("openapi.json describes %s, which no route in routes() serves", op)
		}
	}
}

func TestOpenAPIAndDocsAreServed(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withToken("tok-1"))
	r := e.do("GET", "/openapi.json", "")
	if r.status != http.StatusOK {
		t.Fatalf("%s, want 200 without a token", r)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type = %q, want application/json", r.what, ct)
	}
	var doc struct {
		OpenAPI string `json:"openapi"`
	}
	if err := json.Unmarshal(r.body, &doc); err != nil {
		t.Fatalf("%s: body does not parse: %v", r.what, err)
	}
	if !regexp.MustCompile(`^3\.1\.\d+$`).MatchString(doc.OpenAPI) {
		t.Errorf("%s: openapi = %q, want 3.1.x", r.what, doc.OpenAPI)
	}

	r = e.do("GET", "/docs", "")
	if r.status != http.StatusOK {
		t.Fatalf("%s, want 200 without a token", r)
	}
	if mt, _, _ := mime.ParseMediaType(r.header.Get("Content-Type")); mt != "text/html" {
		t.Errorf("%s: Content-Type = %q, want text/html", r.what, r.header.Get("Content-Type"))
	}
	if !strings.Contains(string(r.body), `"/openapi.json"`) {
		t.Errorf("%s: the page does not load /openapi.json:\n%s", r.what, r.body)
	}
}

// TestOpenAPIPatternsFollowTheRules checks the patterns openapi.json gives
// email and names against the service's own rules: whatever the service
// accepts, the pattern allows (so a validating client never refuses a good
// value), and the pattern refuses what a regular expression can tell.
func TestOpenAPIPatternsFollowTheRules(t *testing.T) {
	t.Parallel()
	spec, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	pattern := func(path ...string) *regexp.Regexp {
		var node any = spec.root
		for _, name := range path {
			node = node.(map[string]any)[name]
		}
		p, ok := node.(string)
		if !ok {
			t.Fatalf("openapi.json: no pattern at %v", path)
		}
		return regexp.MustCompile(p)
	}
	stored := pattern("components", "schemas", "User", "properties", "email", "pattern")
	inputs := []*regexp.Regexp{
		pattern("components", "schemas", "UserCreate", "properties", "email", "pattern"),
		pattern("components", "schemas", "UserUpdate", "properties", "email", "pattern"),
		pattern("components", "parameters", "Email", "schema", "pattern"),
	}
	for _, email := range []string{
		"ann@example.com", "o'brien+tag@mail.example.co.uk", "jürgen@bücher.example", "a@xn--bcher-kva.example",
		"ju\u0308rgen@bu\u0308cher.example", "अनु@उदाहरण.भारत", "𝒜𝒷@𝒸𝒹.example", "!#$%&'*+/=?^_`{|}~-@example.com",
		strings.Repeat("a", 64) + "@example.com", "a@" + strings.Repeat("b", 63) + ".com",
	} {
		raw := " \t" + strings.ToUpper(email) + "\n "
		got, problem := cleanEmail(raw)
		if problem != "" || got != strings.ToLower(email) {
			t.Fatalf("the service refuses %q: fix the test", raw)
		}
		if !stored.MatchString(got) {
			t.Errorf("User.email pattern refuses %q, which the service stores", got)
		}
		for _, in := range inputs {
			if !in.MatchString(raw) {
				t.Errorf("pattern %s refuses %q, which the service accepts", in, raw)
			}
		}
	}
	for _, email := range []string{
		"a@ex!ample.com", "a@exa{m}ple.com", "a@ex_ample.com", "a@-example.com", "a@example-.com",
		strings.Repeat("a", 65) + "@example.com", "a@" + strings.Repeat("b", 64) + ".com",
		"a@b", `"q"@example.com`, "a@[127.0.0.1]", ".a@example.com", "a.@example.com", "a b@example.com",
	} {
		for _, re := range append(inputs, stored) {
			if re.MatchString(email) {
				t.Errorf("pattern %s allows %q, which the service refuses", re, email)
			}
		}
	}

	for _, path := range [][]string{
		{"components", "schemas", "UserCreate", "properties", "first_name", "pattern"},
		{"components", "schemas", "UserCreate", "properties", "last_name", "pattern"},
		{"components", "schemas", "UserUpdate", "properties", "first_name", "pattern"},
		{"components", "schemas", "UserUpdate", "properties", "last_name", "pattern"},
	} {
		re := pattern(path...)
		for _, tt := range []struct {
			name string
			ok   bool
		}{
			{"  " + strings.Repeat("a", 128) + "  ", true},
			{strings.Repeat("é", 128), true},
			{"O'Brien-Smith de la Cruz", true},
			{"李", true},
			{strings.Repeat("a", 129), false},
			{" " + strings.Repeat("a", 129) + " ", false},
			{"", false},
			{"   ", false},
			{"Ann\tLee", false},
		} {
			if _, problem := cleanName(tt.name); (problem == "") != tt.ok {
				t.Fatalf("the service says %q to %q: fix the test", problem, tt.name)
			}
			if re.MatchString(tt.name) != tt.ok {
				t.Errorf("%s: pattern says %v to %q, the service %v", path[2]+"."+path[4], !tt.ok, tt.name, tt.ok)
			}
		}
	}
}

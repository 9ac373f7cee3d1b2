package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// The fuzzers' seed corpora live in testdata/fuzz and run with every
// go test. To search further: go test -run '^$' -fuzz FuzzUserBody -fuzztime 60s

// FuzzUserBody feeds arbitrary bodies to the decoding and validation of
// creates and updates: never a panic, and either an accepted, normalized
// input or a 400 Invalid data (413 when too large) that says why.
func FuzzUserBody(f *testing.F) {
	f.Add([]byte(`{"first_name":"Ann","last_name":"Lee","email":"ann@example.com","password":"passw0rd-1"}`), true)
	f.Add([]byte(`{"email":null}`), false)
	f.Fuzz(func(t *testing.T, body []byte, create bool) {
		rec := httptest.NewRecorder()
		in, ok := readUserInput(rec, httptest.NewRequest("POST", "/users/", bytes.NewReader(body)), create)
		if ok {
			if rec.Body.Len() != 0 {
				t.Fatalf("accepted input, but an answer was written: %s", rec.Body)
			}
			if create && (in.FirstName == nil || in.LastName == nil || in.Email == nil || in.Password == nil) {
				t.Fatalf("create accepted with a field missing: %+v", in)
			}
			// What was accepted is valid and already normalized: validate
			// sets each field to a new, cleaned string.
			again := in
			if problems := again.validate(create); len(problems) > 0 || !reflect.DeepEqual(in, again) {
				t.Fatalf("accepted input %+v: validated again to %+v, %v", in, again, problems)
			}
			return
		}
		checkRefusal(t, rec, len(body))
	})
}

// checkRefusal checks the answer to a body of size bytes that was refused:
// 400 Invalid data with the reasons, or 413 if it was too large.
func checkRefusal(t *testing.T, rec *httptest.ResponseRecorder, size int) {
	t.Helper()
	var e errorBody
	if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil {
		t.Fatalf("answer %d is not JSON: %q", rec.Code, rec.Body)
	}
	switch rec.Code {
	case http.StatusBadRequest:
		if e.Detail != "Invalid data" || len(e.Errors) == 0 {
			t.Fatalf("400 without detail Invalid data and errors: %s", rec.Body)
		}
	case http.StatusRequestEntityTooLarge:
		if size <= maxBodyBytes {
			t.Fatalf("413 for a body of %d bytes", size)
		}
	default:
		t.Fatalf("answer %d to a body: %s", rec.Code, rec.Body)
	}
}

// FuzzParseNumber checks the parser of ids and numbers: only digits that
// fit int64, and the number written.
func FuzzParseNumber(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		n, ok := parseNumber(s)
		if ok && (strings.TrimLeft(s, "0") != strings.TrimLeft(strconv.FormatInt(n, 10), "0")) {
			t.Fatalf("parseNumber(%q) = %d, not the number written", s, n)
		}
	})
}

// FuzzRequest sends arbitrary requests to the real handler on a real
// database: whatever comes in, the answer is never a 5xx, and every error
// is JSON with a detail.
func FuzzRequest(f *testing.F) {
	e := newTestEnv(f)
	f.Add("POST", "/users/", `{"first_name":"Ann","last_name":"Lee","email":"ann@example.com","password":"passw0rd-1"}`)
	f.Add("PUT", "/users/1", `{"email":"ANN@example.com"}`)
	f.Add("GET", "/users/?limit=2&after_id=1", "")
	f.Add("GET", "/users?email=ann@example.com", "")
	f.Add("DELETE", "/users/1", "")
	f.Add("POST", "/users/authenticate", `{"email":"ann@example.com","password":"passw0rd-1"}`)
	f.Fuzz(func(t *testing.T, method, path, body string) {
		u, err := url.Parse(e.url + path)
		// A target with white space breaks the request line, and net/http
		// answers that itself, before any handler, in plain text.
		if err != nil || !strings.HasPrefix(path, "/") || strings.ContainsAny(u.RequestURI(), " \t\r\n") {
			return
		}
		req, err := http.NewRequest(method, u.String(), strings.NewReader(body))
		if err != nil {
			return // not a request a client could send
		}
		resp, err := noRedirects.Do(req)
		if err != nil {
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode >= 500 {
			t.Fatalf("%s %q: %d %s", method, path, resp.StatusCode, b)
		}
		if resp.StatusCode >= 400 && method != "HEAD" {
			var eb errorBody
			if err := json.Unmarshal(b, &eb); err != nil || eb.Detail == "" {
				t.Fatalf("%s %q: %d with body %q, want JSON with a detail", method, path, resp.StatusCode, b)
			}
			if resp.StatusCode == http.StatusBadRequest && eb.Detail != "Invalid data" && eb.Detail != "Email already registered" && eb.Detail != "Invalid email or password" {
				t.Fatalf("%s %q: 400 %q", method, path, eb.Detail)
			}
		}
	})
}

// FuzzCredentialsBody feeds arbitrary bodies to the decoding of POST
// /users/authenticate: never a panic, and either a normalized email and a
// password, or a 400 Invalid data (413 when too large) that says why.
func FuzzCredentialsBody(f *testing.F) {
	f.Add([]byte(`{"email":"ann@example.com","password":"passw0rd-1"}`))
	f.Add([]byte(`{"email":" Ann@Example.COM ","password":""}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		rec := httptest.NewRecorder()
		in, ok := readCredentials(rec, httptest.NewRequest("POST", "/users/authenticate", bytes.NewReader(body)))
		if ok {
			if rec.Body.Len() != 0 {
				t.Fatalf("accepted credentials, but an answer was written: %s", rec.Body)
			}
			// The email is a valid address, already normalized.
			if email, problem := cleanEmail(in.email); problem != "" || email != in.email {
				t.Fatalf("accepted email %q: cleaned again to %q, %q", in.email, email, problem)
			}
			return
		}
		checkRefusal(t, rec, len(body))
	})
}

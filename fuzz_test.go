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
// creates, updates and sign-ins: never a panic, and either an accepted,
// normalized input or a 400 Invalid data (413 when too large) that says why.
func FuzzUserBody(f *testing.F) {
	f.Add([]byte(`{"first_name":"Ann","last_name":"Lee","email":"ann@example.com","password":"passw0rd-1"}`), true, false)
	f.Add([]byte(`{"email":null}`), false, false)
	f.Add([]byte(`{"email":" Ann@Example.COM ","password":""}`), false, true)
	f.Fuzz(func(t *testing.T, body []byte, create, signIn bool) {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("POST", "/users/", bytes.NewReader(body))
		var ok bool
		if signIn {
			var in credentials
			in, ok = readCredentials(rec, req)
			if email, problem := cleanEmail(in.email); ok && (problem != "" || email != in.email) {
				t.Fatalf("accepted email %q: cleaned again to %q, %q", in.email, email, problem)
			}
		} else {
			var in userInput
			in, ok = readUserInput(rec, req, create)
			if ok && create && (in.FirstName == nil || in.LastName == nil || in.Email == nil || in.Password == nil) {
				t.Fatalf("create accepted with a field missing: %+v", in)
			}
			// What was accepted is valid and already normalized.
			again := in
			if problems := again.validate(create); ok && (len(problems) > 0 || !reflect.DeepEqual(in, again)) {
				t.Fatalf("accepted input %+v: validated again to %+v, %v", in, again, problems)
			}
		}
		if ok && rec.Body.Len() > 0 {
			t.Fatalf("accepted input, but an answer was written: %s", rec.Body)
		} else if !ok {
			checkRefusal(t, rec, len(body))
		}
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

// FuzzUserID checks the parser of ids and numbers: only digits that
// fit int64, and the number written.
func FuzzUserID(f *testing.F) {
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

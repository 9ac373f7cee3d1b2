package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

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

func TestSlowHeadersAreCut(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withServer(func(s *http.Server) { s.ReadHeaderTimeout = 200 * time.Millisecond }))
	conn, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	closed := make(chan struct{})
	go func() {
		conn.Read(make([]byte, 1024)) // returns when the server gives up on us
		close(closed)
	}()
	request := "GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\n\r\n"
	for i := 0; i < len(request); i++ {
		select {
		case <-closed:
			t.Logf("cut after %d of %d header bytes", i, len(request))
			return
		case <-time.After(50 * time.Millisecond): // the trickle would take 2.5s
		}
		if _, err := conn.Write([]byte{request[i]}); err != nil {
			return // cut
		}
	}
	select {
	case <-closed:
	case <-time.After(time.Second):
		t.Fatal("the server waited for the whole trickled header")
	}
	t.Error("the server read a whole header trickled far past ReadHeaderTimeout")
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

func TestIdleConnectionsDoNotBlockNewClients(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	addr := strings.TrimPrefix(e.url, "http://")
	const idle = 1000
	conns := make([]net.Conn, 0, idle)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, idle)
	for i := 0; i < idle; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			// One request, then the connection idles, kept alive.
			fmt.Fprintf(c, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				errs <- err
				return
			}
			resp.Body.Close()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("opening idle connections: %v", err)
	}
	if r := e.do("GET", "/healthz", ""); r.status != http.StatusOK {
		t.Errorf("%s with %d idle connections open, want 200", r, idle)
	}
}

func TestIdleConnectionsAreClosed(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withServer(func(s *http.Server) { s.IdleTimeout = 200 * time.Millisecond }))
	c, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); err == nil {
		t.Fatal("the server sent more on an idle connection")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("an idle keep-alive connection was still open after 5s")
	}
}

func TestGracefulShutdownUnderLoad(t *testing.T) {
	t.Parallel()
	databaseURL, schema := newSchema(t)
	databaseURL = withParam(databaseURL, "application_name", schema)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Each hash takes tens of milliseconds at cost 10 (far more under the
	// race detector), and run lets them use every P but one: the creates
	// queue up, and are still in flight when the shutdown begins.
	addr, _, done := startRun(t, ctx, map[string]string{"DATABASE_URL": databaseURL, "ADDR": "127.0.0.1:0", "BCRYPT_COST": "10"})
	e := &testEnv{t: t, url: "http://" + addr}
	const creates = 3
	results := make(chan response, creates+1)
	for i := 0; i < creates; i++ {
		go func(i int) {
			results <- e.do("POST", "/users/", userBody("Ann", "Lee", fmt.Sprintf("u%d@example.com", i), "password1"))
		}(i)
	}
	go func() { results <- e.do("GET", "/users/?limit=5", "") }()
	// One create is surely in flight: its body is only half sent when the
	// shutdown begins, and the rest follows after.
	slowBody, rest := io.Pipe()
	slow := make(chan int, 1)
	go func() {
		resp, err := noRedirects.Post(e.url+"/users/", "application/json", slowBody)
		if err != nil {
			t.Errorf("POST with a slow body: %v", err)
			slow <- 0
			return
		}
		resp.Body.Close()
		slow <- resp.StatusCode
	}()
	rest.Write([]byte(`{"first_name":"Slow","last_name":"Body",`))
	time.Sleep(150 * time.Millisecond) // the requests are in; the hashes are not done
	cancel()

	// New connections are refused while the requests in flight finish.
	refused := false
	for i := 0; i < 100 && !refused; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			refused = true
		} else {
			c.Close()
			time.Sleep(10 * time.Millisecond)
		}
	}
	if !refused {
		t.Error("new connections were still accepted 1s after shutdown began")
	}
	select {
	case status := <-slow:
		t.Fatalf("the slow create answered %d before its body was complete", status)
	default:
	}
	rest.Write([]byte(`"email":"slow@example.com","password":"password1"}`))
	rest.Close()
	if status := <-slow; status != http.StatusCreated {
		t.Errorf("the create whose body came during shutdown answered %d, want 201", status)
	}
	created := 0
	for i := 0; i < creates+1; i++ {
		r := <-results
		switch {
		case strings.HasPrefix(r.what, "POST") && r.status == http.StatusCreated:
			created++
		case strings.HasPrefix(r.what, "GET") && r.status == http.StatusOK:
		default:
			t.Errorf("%s during shutdown, want its normal answer", r)
		}
	}
	if created != creates {
		t.Errorf("%d of %d creates in flight completed", created, creates)
	}
	waitStopped(t, done)
	waitNoConnections(t, schema)
}

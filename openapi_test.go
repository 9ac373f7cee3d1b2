package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/mail"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

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

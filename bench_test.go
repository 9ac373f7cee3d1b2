//go:build linux

package main

// The load benchmark: the real binary, on a database of its own, under load
// from this process, compared with baselines measured in the same run. It
// runs only when asked for (see README.md, Performance):
//
//	go test -run '^$' -bench Load -benchtime 1x -timeout 30m
//
// It needs Linux, for /proc/<pid>/status.

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// The load. Every run of a generator has a warm-up whose results are thrown
// away, then a fixed window that is measured.
const (
	benchConns     = 32 // GET by id, POST
	benchListConns = 8  // GET list of 1,000
	benchProbe     = 4  // GET by id beside the POST flood
	// Service and baseline alternate this many times (a b, b a, a b, ...);
	// figures are medians over the rounds.
	benchRounds     = 5 // GET by id, list of 1,000
	benchSlowRounds = 3 // POST, list of 1,000,000
	benchBigUsers   = 1_000_000
	benchStarts     = 7 // starts measured for start-to-ready and idle RSS
)

// benchCeilingEnv names the database the ceiling serves when the test binary runs
// as the ceiling's process (TestBenchCeilingProcess).
const benchCeilingEnv = "USERS_BENCH_CEILING_DATABASE_URL"

func BenchmarkLoad(b *testing.B) {
	// The suite is one long measurement: b.N does not repeat it.
	ctx := context.Background()
	work := b.TempDir()
	out := os.Stdout
	progress := func(format string, args ...any) {
		fmt.Fprintf(out, "  %s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}

	binary := filepath.Join(work, "users")
	build := exec.Command("go", "build", "-o", binary, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := build.CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, msg)
	}

	// Both databases are made first, so that their cleanups run after the
	// servers' (cleanups run last in, first out).
	small := newBenchDatabase(b, "users_bench_"+strconv.Itoa(os.Getpid()))
	big := newBenchDatabase(b, "users_bench_"+strconv.Itoa(os.Getpid())+"_1m")
	progress("database %s: %d users", small.name, 1000)
	if err := seedBenchUsers(ctx, small.db, 1000); err != nil {
		b.Fatal(err)
	}
	ids := small.ids(b)

	var pgVersion string
	small.db.QueryRow(`SHOW server_version`).Scan(&pgVersion)
	fmt.Fprintf(out, "\nload benchmark: %d CPUs, %s %s/%s, PostgreSQL %s; every ratio is against a baseline measured in this run\n",
		runtime.NumCPU(), runtime.Version(), runtime.GOOS, runtime.GOARCH, pgVersion)

	procs := &benchProcs{dir: work}
	b.Cleanup(procs.stopAll)
	service := func(db *benchDatabase, cost int) *benchProc {
		return procs.start(b, "service", binary, nil,
			"DATABASE_URL="+db.url, "ADDR=127.0.0.1:0", "BCRYPT_COST="+strconv.Itoa(cost))
	}
	ceiling := func(db *benchDatabase) *benchProc {
		return procs.start(b, "ceiling", os.Args[0], []string{"-test.run=^TestBenchCeilingProcess$", "-test.timeout=30m"},
			benchCeilingEnv+"="+db.url)
	}

	// 6. Start-to-ready and idle RSS, while nothing else runs.
	progress("start-to-ready and idle RSS: %d starts", benchStarts)
	var readies, idles []float64
	for range benchStarts {
		p := service(small, defaultBcryptCost)
		time.Sleep(500 * time.Millisecond)
		rss, err := benchRSS(p.pid())
		if err != nil {
			b.Fatal(err)
		}
		readies = append(readies, benchMS(p.ready.Sub(p.started)))
		idles = append(idles, benchMiB(rss))
		procs.stop(p)
	}

	// 1. GET by id, against the ceiling; then 3., the list of 1,000, against
	// the thin list; then 5., GET by id beside a POST flood.
	svc := service(small, defaultBcryptCost)
	ceil := ceiling(small)
	getByID := func(base string) func(*rand.Rand) *http.Request {
		return func(rng *rand.Rand) *http.Request {
			return benchRequest("GET", base+"/users/"+strconv.FormatInt(ids[rng.IntN(len(ids))], 10), "")
		}
	}
	list := func(base string) func(*rand.Rand) *http.Request {
		return func(*rand.Rand) *http.Request { return benchRequest("GET", base+"/users/", "") }
	}
	short := benchLoadSpec{conns: benchConns, warmup: time.Second, window: 5 * time.Second, want: http.StatusOK}

	var getSvc, getCeil []benchResult
	benchAlternate(benchRounds, func(i int) {
		s := short
		s.request = getByID(svc.url)
		getSvc = append(getSvc, runBenchLoad(s))
		progress("GET by id, round %d: service %s", i+1, getSvc[len(getSvc)-1])
	}, func(i int) {
		s := short
		s.request = getByID(ceil.url)
		getCeil = append(getCeil, runBenchLoad(s))
		progress("GET by id, round %d: ceiling %s", i+1, getCeil[len(getCeil)-1])
	})

	var listSvc, listThin []benchResult
	benchAlternate(benchRounds, func(i int) {
		s := short
		s.conns, s.request = benchListConns, list(svc.url)
		listSvc = append(listSvc, runBenchLoad(s))
		progress("list of 1,000, round %d: service %s", i+1, listSvc[len(listSvc)-1])
	}, func(i int) {
		s := short
		s.conns, s.request = benchListConns, list(ceil.url)
		listThin = append(listThin, runBenchLoad(s))
		progress("list of 1,000, round %d: thin list %s", i+1, listThin[len(listThin)-1])
	})
	procs.stop(ceil)

	probe := benchLoadSpec{conns: benchProbe, warmup: 3 * time.Second, window: 10 * time.Second, want: http.StatusOK, request: getByID(svc.url)}
	quiet := runBenchLoad(probe)
	progress("GET by id, %d conns, alone: %s", benchProbe, quiet)
	flood := benchLoadSpec{conns: benchConns, warmup: probe.warmup, window: probe.window, want: http.StatusCreated, request: benchCreates(svc.url)}
	var floodRes, busy benchResult
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); floodRes = runBenchLoad(flood) }()
	go func() { defer wg.Done(); busy = runBenchLoad(probe) }()
	wg.Wait()
	progress("GET by id, %d conns, beside a POST flood: %s", benchProbe, busy)
	progress("the POST flood: %s", floodRes)

	// 2. POST at cost 12 (the service from above) and 10, against raw bcrypt.
	var postRows []benchRow
	for _, cost := range []int{12, 10} {
		if cost != defaultBcryptCost {
			procs.stop(svc)
			svc = service(small, cost)
		}
		post := benchLoadSpec{conns: benchConns, warmup: 3 * time.Second, window: 10 * time.Second, want: http.StatusCreated, request: benchCreates(svc.url)}
		if cost < 12 {
			post.warmup, post.window = 2*time.Second, 6*time.Second
		}
		var posts []benchResult
		var raws []float64
		benchAlternate(benchSlowRounds, func(i int) {
			posts = append(posts, runBenchLoad(post))
			progress("POST cost %d, round %d: service %s", cost, i+1, posts[len(posts)-1])
		}, func(i int) {
			raws = append(raws, benchBcryptRate(cost, time.Second, post.window))
			progress("POST cost %d, round %d: raw bcrypt %.1f hash/s on %d goroutines", cost, i+1, raws[len(raws)-1], runtime.GOMAXPROCS(0))
		})
		ratio := benchPairedRatio(benchRates(posts), raws)
		postRows = append(postRows,
			benchRow{fmt.Sprintf("2. POST /users/, cost %d, %d conns", cost, benchConns), fmt.Sprintf("%.1f 201/s", benchMedian(benchRates(posts))),
				fmt.Sprintf("%.1f hash/s raw bcrypt", benchMedian(raws)), ratio, "≥ 0.90×", ratio >= 0.9},
			benchRow{"   p50 / p99", benchP50P99(posts), "", math.NaN(), "", nil},
			benchRow{"   answers other than 201", benchOthers(posts), "", math.NaN(), "", nil})
		b.ReportMetric(ratio, fmt.Sprintf("post%d/bcrypt", cost))
	}
	procs.stop(svc)

	// 4. A list of 1,000,000, streamed by a fresh process, service and thin
	// list in turn. Seeding it only now keeps its writes out of the other
	// figures.
	progress("database %s: seeding %d users", big.name, benchBigUsers)
	if err := seedBenchUsers(ctx, big.db, benchBigUsers); err != nil {
		b.Fatal(err)
	}
	var bigSvc, bigThin []benchStream
	stream := func(name string, p *benchProc, into *[]benchStream, round int) {
		r, err := benchStreamList(p)
		procs.stop(p)
		if err != nil {
			b.Fatal(err)
		}
		*into = append(*into, r)
		progress("list of 1,000,000, round %d: %s %s", round+1, name, r)
	}
	benchAlternate(benchSlowRounds, func(i int) {
		stream("service", service(big, defaultBcryptCost), &bigSvc, i)
	}, func(i int) {
		stream("thin list", ceiling(big), &bigThin, i)
	})

	// The table, in the order.
	getRatio := benchPairedRatio(benchRates(getSvc), benchRates(getCeil))
	gp50, cp50 := benchMedianPct(getSvc, 0.50), benchMedianPct(getCeil, 0.50)
	gp99, cp99 := benchMedianPct(getSvc, 0.99), benchMedianPct(getCeil, 0.99)
	rows := []benchRow{
		{fmt.Sprintf("1. GET /users/{id}, %d conns", benchConns), fmt.Sprintf("%.0f req/s", benchMedian(benchRates(getSvc))),
			fmt.Sprintf("%.0f req/s ceiling", benchMedian(benchRates(getCeil))), getRatio, "≥ 0.85×", getRatio >= 0.85},
		{"   p50", benchFmtMS(gp50), benchFmtMS(cp50), benchMS(gp50) / benchMS(cp50), "", nil},
		{"   p99", benchFmtMS(gp99), benchFmtMS(cp99), benchMS(gp99) / benchMS(cp99), "", nil},
		{"   answers other than 200", benchOthers(getSvc), benchOthers(getCeil), math.NaN(), "", nil},
	}
	rows = append(rows, postRows...)
	listRatio := benchPairedRatio(benchRates(listSvc), benchRates(listThin))
	lb, tb := benchMedian(benchByteRates(listSvc)), benchMedian(benchByteRates(listThin))
	rows = append(rows,
		benchRow{fmt.Sprintf("3. GET /users/ (1,000 users), %d conns", benchListConns), fmt.Sprintf("%.0f req/s", benchMedian(benchRates(listSvc))),
			fmt.Sprintf("%.0f req/s thin list", benchMedian(benchRates(listThin))), listRatio, "≥ 0.90×", listRatio >= 0.9},
		benchRow{"   body bytes/s", fmt.Sprintf("%.1f MB/s", lb/1e6), fmt.Sprintf("%.1f MB/s", tb/1e6), benchPairedRatio(benchByteRates(listSvc), benchByteRates(listThin)), "", nil},
		benchRow{"   p50 / p99", benchP50P99(listSvc), benchP50P99(listThin), math.NaN(), "", nil},
	)
	seconds := func(r benchStream) float64 { return r.elapsed.Seconds() }
	growth := func(r benchStream) float64 { return benchMiB(r.growth()) }
	bg := benchMedianOf(bigSvc, growth)
	rows = append(rows,
		benchRow{"4. GET /users/ (1,000,000 users): time", fmt.Sprintf("%.2f s", benchMedianOf(bigSvc, seconds)),
			fmt.Sprintf("%.2f s thin list", benchMedianOf(bigThin, seconds)), benchPairedRatio(benchMap(bigSvc, seconds), benchMap(bigThin, seconds)), "", nil},
		benchRow{"   peak RSS growth while streaming", fmt.Sprintf("%.1f MiB", bg), fmt.Sprintf("%.1f MiB", benchMedianOf(bigThin, growth)), math.NaN(), "< 16 MiB", bg < 16},
	)
	rows = append(rows,
		benchRow{fmt.Sprintf("5. GET p99 beside a POST flood (%d+%d conns)", benchProbe, benchConns), benchFmtMS(busy.pct(0.99)),
			benchFmtMS(quiet.pct(0.99)) + " alone", benchMS(busy.pct(0.99)) / benchMS(quiet.pct(0.99)), "< 20 ms", benchMS(busy.pct(0.99)) < 20},
		benchRow{"   GET p50; GET req/s", fmt.Sprintf("%s; %.0f req/s", benchFmtMS(busy.pct(0.5)), busy.rate()),
			fmt.Sprintf("%s; %.0f req/s", benchFmtMS(quiet.pct(0.5)), quiet.rate()), math.NaN(), "", nil},
		benchRow{"   the flood: 201/s; other answers", fmt.Sprintf("%.1f; %s", floodRes.rate(), benchOthers([]benchResult{floodRes})), "", math.NaN(), "", nil},
	)
	idle, ready := benchMedian(idles), benchMedian(readies)
	rows = append(rows,
		benchRow{"6. idle RSS after start", fmt.Sprintf("%.1f MiB", idle), "", math.NaN(), "< 20 MiB", idle < 20},
		benchRow{"   start to first 200 on /healthz", fmt.Sprintf("%.1f ms", ready), "", math.NaN(), "< 100 ms", ready < 100},
	)
	fmt.Fprintln(out)
	printBenchTable(out, rows)
	fmt.Fprintf(out, "Figures are medians over rounds (%d for 1 and 3, %d for 2 and 4), in which service and baseline alternate;\n"+
		"a ratio is the median of the rounds' ratios. Start: %d starts, %.1f to %.1f ms.\n\n",
		benchRounds, benchSlowRounds, benchStarts, slices.Min(readies), slices.Max(readies))
	if n := procs.logProblems(out); n > 0 {
		fmt.Fprintln(out)
	}

	b.ReportMetric(getRatio, "get/ceiling")
	b.ReportMetric(listRatio, "list/thin")
	b.ReportMetric(bg, "1M-RSS-MiB")
	b.ReportMetric(benchMS(busy.pct(0.99)), "flood-p99-ms")
	b.ReportMetric(idle, "idle-RSS-MiB")
	b.ReportMetric(ready, "ready-ms")
}

// TestBenchCeilingProcess is not a test: BenchmarkLoad runs the test binary
// with it to serve the ceiling in a process of its own, as the service runs,
// so that neither shares a Go runtime with the load generator.
func TestBenchCeilingProcess(t *testing.T) {
	databaseURL := os.Getenv(benchCeilingEnv)
	if databaseURL == "" {
		return
	}
	db, err := sql.Open("postgres", databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(benchPool.maxOpen)
	db.SetMaxIdleConns(benchPool.maxIdle)
	h, err := newBenchCeiling(db)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: readHeaderTimeout, IdleTimeout: idleTimeout}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go srv.Serve(ln)
	fmt.Printf("msg=listening addr=%s\n", ln.Addr())
	<-ctx.Done()
	shutdownCtx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	srv.Shutdown(shutdownCtx)
}

// benchDatabase is a database made for one run, dropped at its end.
type benchDatabase struct {
	name, url string
	db        *sql.DB
}

func newBenchDatabase(b *testing.B, name string) *benchDatabase {
	b.Helper()
	if _, err := adminDB.Exec(`CREATE DATABASE ` + name); err != nil {
		b.Fatalf("create database %s: %v", name, err)
	}
	b.Cleanup(func() {
		if _, err := adminDB.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`); err != nil {
			b.Errorf("drop database %s: %v", name, err)
		}
	})
	d := &benchDatabase{name: name, url: benchWithDatabase(testDatabaseURL(), name)}
	// The schema comes from the same code the service runs at start.
	st, err := openStore(context.Background(), d.url, poolConfig{maxOpen: 2, maxIdle: 2, maxIdleTime: time.Minute}, time.Minute)
	if err != nil {
		b.Fatalf("openStore %s: %v", name, err)
	}
	b.Cleanup(func() { st.Close() })
	d.db = st.db
	return d
}

// ids returns every user id in the database.
func (d *benchDatabase) ids(b *testing.B) []int64 {
	rows, err := d.db.Query(`SELECT id FROM users ORDER BY id`)
	if err != nil {
		b.Fatal(err)
	}
	defer rows.Close()
	var ids []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			b.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil || len(ids) == 0 {
		b.Fatalf("read ids: %v (%d ids)", err, len(ids))
	}
	return ids
}

// benchWithDatabase returns databaseURL with its database name replaced.
func benchWithDatabase(databaseURL, name string) string {
	if u, err := url.Parse(databaseURL); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		u.Path = "/" + name
		return u.String()
	}
	return databaseURL + " dbname=" + name
}

// benchProc is a server process: the service or the ceiling.
type benchProc struct {
	name           string
	cmd            *exec.Cmd
	logPath        string
	url            string // http://127.0.0.1:port
	started, ready time.Time
	exited         chan struct{}
}

func (p *benchProc) pid() int { return p.cmd.Process.Pid }

// benchProcs starts server processes and stops those still running at the
// end.
type benchProcs struct {
	dir     string
	mu      sync.Mutex
	n       int
	running []*benchProc
	logs    []string
}

var benchListening = regexp.MustCompile(`msg=listening addr=(\S+)`)

// start runs path with args, the environment of this process without the
// service's own variables, and env; and waits until it answers 200 on
// /healthz. Its output goes to a file, as a service's standard output
// usually does.
func (ps *benchProcs) start(b *testing.B, name, path string, args []string, env ...string) *benchProc {
	b.Helper()
	ps.mu.Lock()
	ps.n++
	logPath := filepath.Join(ps.dir, fmt.Sprintf("%s-%d.log", name, ps.n))
	ps.logs = append(ps.logs, logPath)
	ps.mu.Unlock()
	logFile, err := os.Create(logPath)
	if err != nil {
		b.Fatal(err)
	}
	defer logFile.Close()

	cmd := exec.Command(path, args...)
	for _, kv := range os.Environ() {
		switch k, _, _ := strings.Cut(kv, "="); k {
		case "DATABASE_URL", "ADDR", "PORT", "BCRYPT_COST", "DB_MAX_CONNS", "API_TOKEN", benchCeilingEnv:
		default:
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// If this process dies without cleaning up (a -timeout panic), so
	// does the server.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	p := &benchProc{name: name, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	p.started = time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatalf("start %s: %v", name, err)
	}
	go func() { cmd.Wait(); close(p.exited) }()
	ps.mu.Lock()
	ps.running = append(ps.running, p)
	ps.mu.Unlock()

	fail := func(format string, args ...any) {
		b.Helper()
		log, _ := os.ReadFile(logPath)
		b.Fatalf("%s: %s; its output:\n%s", name, fmt.Sprintf(format, args...), log)
	}
	deadline := p.started.Add(10 * time.Second)
	for p.url == "" {
		if m := benchListening.FindSubmatch(benchReadHead(logPath)); m != nil {
			p.url = "http://" + string(m[1])
			break
		}
		select {
		case <-p.exited:
			fail("exited before listening")
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			fail("not listening after 10 s")
		}
	}
	client := &http.Client{Timeout: 5 * time.Second}
	for {
		resp, err := client.Get(p.url + "/healthz")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				p.ready = time.Now()
				break
			}
		}
		if time.Now().After(deadline) {
			fail("/healthz not 200 after 10 s: %v", err)
		}
		time.Sleep(time.Millisecond)
	}
	client.CloseIdleConnections()
	return p
}

// benchReadHead returns the first 4 KiB of the file at path.
func benchReadHead(path string) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	buf := make([]byte, 4096)
	n, _ := io.ReadFull(f, buf)
	return buf[:n]
}

// stop sends p SIGTERM and waits for it to exit, killing it after 25 s.
func (ps *benchProcs) stop(p *benchProc) {
	ps.mu.Lock()
	ps.running = slices.DeleteFunc(ps.running, func(q *benchProc) bool { return q == p })
	ps.mu.Unlock()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(25 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
	}
}

func (ps *benchProcs) stopAll() {
	ps.mu.Lock()
	running := slices.Clone(ps.running)
	ps.mu.Unlock()
	for _, p := range running {
		ps.stop(p)
	}
}

// logProblems prints the servers' warnings and errors, at most 10, and
// returns how many there were.
func (ps *benchProcs) logProblems(w io.Writer) int {
	n := 0
	for _, path := range ps.logs {
		log, _ := os.ReadFile(path)
		for _, line := range bytes.Split(log, []byte("\n")) {
			if bytes.Contains(line, []byte("level=WARN")) || bytes.Contains(line, []byte("level=ERROR")) || bytes.Contains(line, []byte("panic")) {
				if n < 10 {
					fmt.Fprintf(w, "server log %s: %s\n", filepath.Base(path), line)
				}
				n++
			}
		}
	}
	if n > 0 {
		fmt.Fprintf(w, "server logs: %d warnings and errors\n", n)
	}
	return n
}

// benchLoadSpec is one run of the load generator: conns goroutines, each with a
// connection of its own, send requests back to back for warmup + window;
// only answers that arrive within the window count.
type benchLoadSpec struct {
	conns          int
	warmup, window time.Duration
	want           int // the status that counts toward the rate
	request        func(rng *rand.Rand) *http.Request
}

type benchResult struct {
	window   time.Duration
	ok       int         // answers with the wanted status
	bytes    int64       // their body bytes
	statuses map[int]int // other answers by status; 0 is a transport error
	lat      []float64   // latencies of all answers, ms, sorted
	firstErr string      // the first transport error or unwanted answer
}

func (r benchResult) rate() float64     { return float64(r.ok) / r.window.Seconds() }
func (r benchResult) byteRate() float64 { return float64(r.bytes) / r.window.Seconds() }

// pct returns the p-quantile of the latencies, by nearest rank.
func (r benchResult) pct(p float64) time.Duration {
	if len(r.lat) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(r.lat)))) - 1
	return time.Duration(r.lat[max(i, 0)] * float64(time.Millisecond))
}

func (r benchResult) String() string {
	s := fmt.Sprintf("%.1f/s, p50 %s, p99 %s, %d answers", r.rate(), benchFmtMS(r.pct(0.5)), benchFmtMS(r.pct(0.99)), len(r.lat))
	if r.bytes > 0 {
		s += fmt.Sprintf(", %.1f MB/s", r.byteRate()/1e6)
	}
	if len(r.statuses) > 0 {
		s += fmt.Sprintf(", others %v (first: %s)", r.statuses, r.firstErr)
	}
	return s
}

var benchRunSeq atomic.Int64

func runBenchLoad(spec benchLoadSpec) benchResult {
	tr := &http.Transport{
		MaxIdleConnsPerHost: spec.conns,
		MaxConnsPerHost:     spec.conns,
		DisableCompression:  true,
		IdleConnTimeout:     30 * time.Second,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: time.Minute}
	start := time.Now()
	from := start.Add(spec.warmup)
	to := from.Add(spec.window)
	run := uint64(benchRunSeq.Add(1))

	results := make([]benchResult, spec.conns)
	var wg sync.WaitGroup
	for w := range spec.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[w]
			r.statuses = map[int]int{}
			rng := rand.New(rand.NewPCG(run, uint64(w)))
			for seq := 0; seq < 10_000_000 && time.Now().Before(to); seq++ {
				req := spec.request(rng)
				t0 := time.Now()
				status, n, err := benchSend(client, req)
				t1 := time.Now()
				if t1.Before(from) || t1.After(to) {
					continue
				}
				r.lat = append(r.lat, benchMS(t1.Sub(t0)))
				if status == spec.want {
					r.ok++
					r.bytes += n
					continue
				}
				r.statuses[status]++
				if r.firstErr == "" {
					r.firstErr = fmt.Sprintf("%s %s: %d %v", req.Method, req.URL.Path, status, err)
				}
			}
		}()
	}
	wg.Wait()
	total := benchResult{window: spec.window, statuses: map[int]int{}}
	for _, r := range results {
		total.ok += r.ok
		total.bytes += r.bytes
		total.lat = append(total.lat, r.lat...)
		for s, n := range r.statuses {
			total.statuses[s] += n
		}
		if total.firstErr == "" {
			total.firstErr = r.firstErr
		}
	}
	if len(total.statuses) == 0 {
		total.statuses = nil
	}
	slices.Sort(total.lat)
	return total
}

// benchSend sends req and reads the whole answer; status 0 is a transport error.
// For an answer other than 200 or 201, err holds the start of its body.
func benchSend(client *http.Client, req *http.Request) (status int, n int64, err error) {
	resp, err := client.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusCreated {
		head, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
		err = errors.New(strings.TrimSpace(string(head)))
	}
	n, rerr := io.Copy(io.Discard, resp.Body)
	if rerr != nil {
		return 0, n, rerr
	}
	return resp.StatusCode, n, err
}

func benchRequest(method, url, body string) *http.Request {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		panic(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	return req
}

// benchUserSeq numbers the users benchCreates makes.
var benchUserSeq atomic.Int64

// benchCreates makes POST requests for users that do not exist yet.
func benchCreates(base string) func(*rand.Rand) *http.Request {
	return func(*rand.Rand) *http.Request {
		body := fmt.Sprintf(`{"first_name": "Bench", "last_name": "User", "email": "bench-%d-%d@example.com", "password": %q}`,
			os.Getpid(), benchUserSeq.Add(1), benchPassword)
		return benchRequest("POST", base+"/users/", body)
	}
}

// benchBcryptRate returns how many bcrypt hashes at cost GOMAXPROCS goroutines
// finish per second within window, after warmup.
func benchBcryptRate(cost int, warmup, window time.Duration) float64 {
	from := time.Now().Add(warmup)
	to := from.Add(window)
	var done atomic.Int64
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 1_000_000 && time.Now().Before(to); i++ {
				bcrypt.GenerateFromPassword([]byte(benchPassword), cost)
				if t := time.Now(); t.After(from) && t.Before(to) {
					done.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return float64(done.Load()) / window.Seconds()
}

// benchStream is one GET of the whole list.
type benchStream struct {
	elapsed    time.Duration
	bytes      int64
	objects    int
	rssBefore  int64 // bytes
	rssPeak    int64 // highest VmRSS sampled while streaming
	hwmGrowth  int64 // VmHWM after the stream minus VmRSS before it
	sampleSize int
}

func (r benchStream) growth() int64 { return max(r.rssPeak-r.rssBefore, 0) }

func (r benchStream) String() string {
	return fmt.Sprintf("%d users, %.1f MB in %.2f s; RSS %.1f MiB before, peak growth %.1f MiB (%d samples; VmHWM growth %.1f MiB)",
		r.objects, float64(r.bytes)/1e6, r.elapsed.Seconds(), benchMiB(r.rssBefore), benchMiB(r.growth()), r.sampleSize, benchMiB(r.hwmGrowth))
}

// benchStreamList reads GET /users/ from p whole, sampling p's RSS every 10 ms.
func benchStreamList(p *benchProc) (benchStream, error) {
	var r benchStream
	time.Sleep(300 * time.Millisecond) // let the start settle
	var err error
	if r.rssBefore, err = benchRSS(p.pid()); err != nil {
		return r, err
	}
	done := make(chan struct{})
	sampled := make(chan struct{})
	peak, samples := r.rssBefore, 0
	go func() {
		defer close(sampled)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := 0; i < 60_000; i++ { // at most 10 minutes
			select {
			case <-done:
				return
			case <-tick.C:
			}
			if rss, err := benchRSS(p.pid()); err == nil {
				peak = max(peak, rss)
				samples++
			}
		}
	}()
	client := &http.Client{Timeout: 10 * time.Minute}
	start := time.Now()
	resp, err := client.Get(p.url + "/users/")
	if err == nil {
		buf := make([]byte, 256<<10)
		var last byte
		for {
			n, rerr := resp.Body.Read(buf)
			r.bytes += int64(n)
			r.objects += bytes.Count(buf[:n], []byte("{"))
			if n > 0 {
				last = buf[n-1]
			}
			if rerr != nil {
				if rerr != io.EOF {
					err = rerr
				}
				break
			}
		}
		resp.Body.Close()
		if err == nil && (resp.StatusCode != http.StatusOK || last != '\n') {
			err = fmt.Errorf("status %d, last byte %q", resp.StatusCode, last)
		}
	}
	r.elapsed = time.Since(start)
	close(done)
	<-sampled
	r.rssPeak, r.sampleSize = peak, samples
	if err != nil {
		return r, fmt.Errorf("%s: GET /users/: %w", p.name, err)
	}
	if hwm, err := benchProcStatus(p.pid(), "VmHWM:"); err == nil {
		r.hwmGrowth = hwm - r.rssBefore
	}
	return r, nil
}

// benchRSS returns the resident set size of process pid, in bytes.
func benchRSS(pid int) (int64, error) { return benchProcStatus(pid, "VmRSS:") }

// benchProcStatus returns a "kB" field of /proc/<pid>/status, in bytes.
func benchProcStatus(pid int, field string) (int64, error) {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, field); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// benchRow is one line of the result table. A NaN ratio and a nil met are
// left blank.
type benchRow struct {
	figure, value, baseline string
	ratio                   float64
	target                  string
	met                     any // bool, or nil for no target
}

func printBenchTable(w io.Writer, rows []benchRow) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tservice\tbaseline\tratio\ttarget\t")
	for _, r := range rows {
		ratio := ""
		if !math.IsNaN(r.ratio) {
			ratio = fmt.Sprintf("%.2f×", r.ratio)
		}
		met := ""
		switch r.met {
		case true:
			met = "met"
		case false:
			met = "MISSED"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.figure, r.value, r.baseline, ratio, r.target, met)
	}
	tw.Flush()
}

func benchRates(rs []benchResult) []float64     { return benchMap(rs, benchResult.rate) }
func benchByteRates(rs []benchResult) []float64 { return benchMap(rs, benchResult.byteRate) }

func benchMedianPct(rs []benchResult, p float64) time.Duration {
	var v []float64
	for _, r := range rs {
		v = append(v, float64(r.pct(p)))
	}
	return time.Duration(benchMedian(v))
}

func benchP50P99(rs []benchResult) string {
	return benchFmtMS(benchMedianPct(rs, 0.5)) + " / " + benchFmtMS(benchMedianPct(rs, 0.99))
}

// benchOthers sums the unwanted answers of rs.
func benchOthers(rs []benchResult) string {
	sum := map[int]int{}
	for _, r := range rs {
		for s, n := range r.statuses {
			sum[s] += n
		}
	}
	if len(sum) == 0 {
		return "none"
	}
	return fmt.Sprint(sum)
}

// benchAlternate runs a and b rounds times each, in the order a b, b a, a b, ...,
// so that drift during the run weighs on both alike.
func benchAlternate(rounds int, a, b func(round int)) {
	for i := range rounds {
		if i%2 == 0 {
			a(i)
			b(i)
		} else {
			b(i)
			a(i)
		}
	}
}

// benchPairedRatio returns the median of x[i]/y[i]. The two figures of a round
// were measured seconds apart, so drift cancels better in their ratio than
// in the ratio of two medians.
func benchPairedRatio(x, y []float64) float64 {
	var r []float64
	for i := range min(len(x), len(y)) {
		r = append(r, x[i]/y[i])
	}
	return benchMedian(r)
}

func benchMap[T any](xs []T, f func(T) float64) []float64 {
	var v []float64
	for _, x := range xs {
		v = append(v, f(x))
	}
	return v
}

func benchMedianOf[T any](xs []T, f func(T) float64) float64 { return benchMedian(benchMap(xs, f)) }

func benchMedian(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func benchMS(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
func benchMiB(n int64) float64        { return float64(n) / (1 << 20) }

func benchFmtMS(d time.Duration) string { return fmt.Sprintf("%.2f ms", benchMS(d)) }

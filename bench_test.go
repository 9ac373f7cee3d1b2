package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// benchHash is the bcrypt hash (cost 12) of "correct horse battery staple".
// Seeded users all carry it, so that seeding costs no bcrypt at all.
const benchHash = "$2a$12$39HUuk9X/zmfXFzzeU/24.vqftitBT9zuqoeLXvMN9ROGH/zTr/qK"

// newBenchCeiling returns the thinnest handlers the stack allows for the two
// reads, the baseline BenchmarkHandler compares the service with: one
// prepared statement per look-up, one query for the whole list scanned into
// one reused struct, rows encoded one by one, no middleware, no access log,
// no validation.
func newBenchCeiling(db *sql.DB) (http.Handler, error) {
	byID, err := db.Prepare(`SELECT ` + userColumns + ` FROM users WHERE id = $1`)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /users/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, _ := strconv.ParseInt(r.PathValue("id"), 10, 64)
		var u user
		err := byID.QueryRowContext(r.Context(), id).Scan(&u.ID, &u.FirstName, &u.LastName, &u.Email, &u.CreatedAt, &u.UpdatedAt)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(u)
	})
	mux.HandleFunc("GET /users/{$}", func(w http.ResponseWriter, r *http.Request) {
		rows, err := db.QueryContext(r.Context(), `SELECT `+userColumns+` FROM users ORDER BY id`)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer rows.Close()
		w.Header().Set("Content-Type", "application/json")
		bw := bufio.NewWriterSize(w, 32<<10)
		enc := json.NewEncoder(bw)
		bw.WriteByte('[')
		var u user
		for n := 0; rows.Next(); n++ {
			if err := rows.Scan(&u.ID, &u.FirstName, &u.LastName, &u.Email, &u.CreatedAt, &u.UpdatedAt); err != nil {
				panic(http.ErrAbortHandler)
			}
			if n > 0 {
				bw.WriteByte(',')
			}
			enc.Encode(u)
		}
		if rows.Err() != nil {
			panic(http.ErrAbortHandler)
		}
		bw.WriteString("]\n")
		bw.Flush()
	})
	return mux, nil
}

// benchPool is the service's default pool (DB_MAX_CONNS=16), not the
// tests' small testPool: the benchmark measures the service as it runs.
var benchPool = poolConfig{maxOpen: 16, maxIdle: 16, maxIdleTime: 5 * time.Minute}

// BenchmarkHandler serves the read paths in process, without a network or an
// HTTP client, so that a CPU or allocation profile shows the handler's own
// work:
//
//	go test -run '^$' -bench 'Handler/get/service$' -cpuprofile cpu.prof
//	go tool pprof -top users.test cpu.prof
//
// Beside the service it runs the ceiling handler, and the service without
// its access log ("nolog": a logger whose level hides Info), which isolates
// the log's cost.
func BenchmarkHandler(b *testing.B) {
	ctx := context.Background()
	databaseURL, _ := newSchema(b)
	st, err := openStore(ctx, databaseURL, benchPool, queryTimeout)
	if err != nil {
		b.Fatalf("openStore: %v", err)
	}
	b.Cleanup(func() { st.Close() })
	// 1,000 users, with the ids that follow the table's.
	if _, err := st.db.ExecContext(ctx, `
		INSERT INTO users (first_name, last_name, email, password, salt)
		SELECT 'First' || i, 'Last' || i, 'user' || i || '@example.com', $2, $3
		FROM generate_series(1, $1::bigint) AS i`, 1000, benchHash, benchHash[:bcryptSaltLen]); err != nil {
		b.Fatalf("seed users: %v", err)
	}
	if _, err := st.db.ExecContext(ctx, `ANALYZE users`); err != nil {
		b.Fatalf("analyze users: %v", err)
	}

	// The access log goes to a file, as the service's standard output
	// usually does: one write(2) per line.
	logFile, err := os.CreateTemp(b.TempDir(), "access-*.log")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { logFile.Close() })
	logger := slog.New(slog.NewTextHandler(logFile, nil))
	quiet := slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelError}))
	// The reads never hash: the cheapest cost keeps the dummy hash the
	// hasher makes at start out of the profile.
	h := newHasher(bcrypt.MinCost, runtime.GOMAXPROCS(0), hashWait)

	ceilingDB, err := sql.Open("postgres", databaseURL)
	if err != nil {
		b.Fatal(err)
	}
	ceilingDB.SetMaxOpenConns(benchPool.maxOpen)
	ceilingDB.SetMaxIdleConns(benchPool.maxIdle)
	b.Cleanup(func() { ceilingDB.Close() })
	ceiling, err := newBenchCeiling(ceilingDB)
	if err != nil {
		b.Fatal(err)
	}

	handlers := []struct {
		name string
		h    http.Handler
	}{
		{"service", newServer(logger, st, h, "", serverOptions{maxStreams: defaultMaxStreams, streamStall: streamStall})},
		{"service-nolog", newServer(quiet, st, h, "", serverOptions{maxStreams: defaultMaxStreams, streamStall: streamStall})},
		{"ceiling", ceiling},
	}
	paths := []struct {
		name  string
		path  func(n uint64) string
		conns int
	}{
		{"get", func(n uint64) string { return "/users/" + strconv.FormatUint(n%1000+1, 10) }, 32},
		{"list", func(uint64) string { return "/users/" }, 8},
	}
	for _, p := range paths {
		for _, hd := range handlers {
			b.Run(p.name+"/"+hd.name, func(b *testing.B) {
				rec := httptest.NewRecorder()
				hd.h.ServeHTTP(rec, httptest.NewRequest("GET", p.path(0), nil))
				if rec.Code != http.StatusOK {
					b.Fatalf("GET %s: status = %d, want 200; body: %.200s", p.path(0), rec.Code, rec.Body)
				}
				size := rec.Body.Len()
				var next atomic.Uint64
				b.SetParallelism((p.conns + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
				b.ReportAllocs()
				b.ResetTimer()
				start := time.Now()
				b.RunParallel(func(pb *testing.PB) {
					// net/http gives every request a context that ends
					// when its connection does; database/sql watches such
					// a context with a goroutine per query, so the
					// handlers pay for it here as they do when served.
					ctx, cancel := context.WithCancel(context.Background())
					defer cancel()
					for pb.Next() {
						rec := httptest.NewRecorder()
						hd.h.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, "GET", p.path(next.Add(1)), nil))
						if rec.Code != http.StatusOK {
							b.Errorf("GET: status = %d, want 200", rec.Code)
							return
						}
					}
				})
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "req/s")
				b.ReportMetric(float64(size), "B/resp")
			})
		}
	}
}

// BenchmarkAuthenticate times a wrong-password check, an unknown-email check
// and a check of a password over 72 bytes at the default bcrypt cost, b.N
// rounds of each, and reports their medians and ratios:
//
//	go test -run '^$' -bench Authenticate -benchtime 15x .
func BenchmarkAuthenticate(b *testing.B) {
	medians, ratios := authTimings(b, defaultBcryptCost, b.N)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(medians[0]), "wrong-password-p50-ms")
	b.ReportMetric(ms(medians[1]), "unknown-email-p50-ms")
	b.ReportMetric(ms(medians[2]), "long-password-p50-ms")
	b.ReportMetric(float64(medians[1])/float64(medians[0]), "unknown/wrong")
	b.ReportMetric(ratios[0], "unknown/wrong-paired")
	b.ReportMetric(ratios[1], "long/wrong-paired")
}

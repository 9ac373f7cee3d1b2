package main

import (
	"context"
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

// benchHash, a hash of "correct horse battery staple", is every seeded user's: seeding hashes nothing.
const benchHash = "$2a$12$39HUuk9X/zmfXFzzeU/24.vqftitBT9zuqoeLXvMN9ROGH/zTr/qK"

// BenchmarkHandler serves the two reads in process, without a network, so
// that a profile shows the handler's own work, with the service's default
// pool (README: Benchmarks). Its ratios are measured end to end, not here.
func BenchmarkHandler(b *testing.B) {
	pool := poolConfig{maxOpen: 16, maxIdle: 16, maxIdleTime: 5 * time.Minute}
	databaseURL, _ := newSchema(b)
	st := newStoreWith(b, databaseURL, pool, queryTimeout)
	// 1,000 users, with the ids that follow the table's.
	if _, err := st.db.Exec(`INSERT INTO users (first_name, last_name, email, password, salt) SELECT 'First' || i, 'Last' || i,
		'user' || i || '@example.com', $1, $2 FROM generate_series(1, 1000) AS i`, benchHash, benchHash[:bcryptSaltLen]); err != nil {
		b.Fatalf("seed users: %v", err)
	}
	if _, err := st.db.Exec(`ANALYZE users`); err != nil {
		b.Fatal(err)
	}
	// The access log goes to a file, as standard output usually does: one write(2) a line.
	logFile, err := os.CreateTemp(b.TempDir(), "access-*.log")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { logFile.Close() })
	// The reads never hash: the cheapest cost keeps the hasher's start out of the profile.
	service := newServer(newTestLogger(logFile), st, newHasher(bcrypt.MinCost, runtime.GOMAXPROCS(0), hashWait), "",
		serverOptions{maxStreams: defaultMaxStreams, streamStall: streamStall})
	for _, p := range []struct {
		name  string
		path  func(n uint64) string
		conns int
	}{
		{"get", func(n uint64) string { return "/users/" + strconv.FormatUint(n%1000+1, 10) }, 32},
		{"list", func(uint64) string { return "/users/" }, 8},
	} {
		b.Run(p.name+"/service", func(b *testing.B) {
			var next atomic.Uint64
			b.SetParallelism((p.conns + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
			b.ReportAllocs()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				// A request's context ends with its connection: database/sql
				// watches it with a goroutine per query, as when served.
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				for pb.Next() {
					rec, path := httptest.NewRecorder(), p.path(next.Add(1))
					service.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, "GET", path, nil))
					if rec.Code != http.StatusOK {
						b.Errorf("GET %s: status = %d, want 200; body: %.200s", path, rec.Code, rec.Body)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "req/s")
		})
	}
}

// BenchmarkAuthenticate reports the medians and ratios of b.N wrong-password,
// unknown-email and over-72-byte checks at the default bcrypt cost:
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

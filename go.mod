module users

go 1.22

require (
	github.com/lib/pq v1.12.3
	golang.org/x/crypto v0.33.0
)

module users

go 1.26.0

require (
	github.com/lib/pq v1.12.3
	golang.org/x/crypto v0.59.0
)

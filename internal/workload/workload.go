package workload

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// ErrMismatch reports an echo that differs from what was sent.
var ErrMismatch = errors.New("workload: the echo differs")

// ErrNoHalfClose reports a connection without CloseWrite.
var ErrNoHalfClose = errors.New("workload: the connection cannot half-close")

type halfCloser interface{ CloseWrite() error }

// Bulk writes data to c in writes of at most chunk bytes, half-closes c
// and reads the server's 32-byte digest, which it returns for the caller
// to compare with sha256.Sum256(data) (outside any timed span).
func Bulk(c net.Conn, data []byte, chunk int) ([32]byte, error) {
	var digest [32]byte
	if chunk <= 0 {
		return digest, fmt.Errorf("workload: chunk %d", chunk)
	}
	for p := data; len(p) > 0; {
		k := min(len(p), chunk)
		if _, err := c.Write(p[:k]); err != nil {
			return digest, err
		}
		p = p[k:]
	}
	hc, ok := c.(halfCloser)
	if !ok {
		return digest, ErrNoHalfClose
	}
	if err := hc.CloseWrite(); err != nil {
		return digest, err
	}
	if _, err := io.ReadFull(c, digest[:]); err != nil {
		return digest, fmt.Errorf("workload: reading the digest: %w", err)
	}
	return digest, nil
}

// Digest is Bulk's server: it hashes what it reads from c until end of
// stream and answers with the SHA-256. It returns how many bytes it read.
func Digest(c io.ReadWriter) (int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		return n, err
	}
	_, err = c.Write(h.Sum(nil))
	return n, err
}

// PingPong sends warm+rounds messages of size bytes (at least 2) on c,
// one at a time, each numbered in its first two bytes, and checks each
// echo byte for byte. It returns the time the last rounds took; the first
// warm are not timed. Then it half-closes c and reads it to end of stream.
func PingPong(c net.Conn, size, warm, rounds int) (time.Duration, error) {
	if size < 2 || warm < 0 || rounds <= 0 {
		return 0, fmt.Errorf("workload: ping-pong of %d-byte messages, %d warm, %d timed", size, warm, rounds)
	}
	ping, pong := make([]byte, size), make([]byte, size)
	start := time.Now()
	for i := 0; i < warm+rounds; i++ {
		if i == warm {
			start = time.Now()
		}
		ping[0], ping[1] = byte(i), byte(i>>8)
		if _, err := c.Write(ping); err != nil {
			return 0, err
		}
		if _, err := io.ReadFull(c, pong); err != nil {
			return 0, err
		}
		if string(ping) != string(pong) {
			return 0, fmt.Errorf("ping-pong %d: %w", i, ErrMismatch)
		}
	}
	el := time.Since(start)
	hc, ok := c.(halfCloser)
	if !ok {
		return el, ErrNoHalfClose
	}
	hc.CloseWrite()
	if _, err := io.Copy(io.Discard, c); err != nil && !errors.Is(err, io.EOF) {
		return el, err
	}
	return el, nil
}

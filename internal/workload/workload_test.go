package workload_test

import (
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/vsdp/vsdp/internal/workload"
)

// serve runs handle on every connection to a loopback listener and
// returns a dialer for it; everything ends with the test.
func serve(t *testing.T, handle func(*net.TCPConn)) func() *net.TCPConn {
	t.Helper()
	before := runtime.NumGoroutine()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	conns := make(chan struct{}, 64)
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns <- struct{}{}
			go func() {
				defer func() { <-conns }()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		for deadline := time.Now().Add(5 * time.Second); runtime.NumGoroutine() > before && time.Now().Before(deadline); {
			time.Sleep(5 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			t.Errorf("%d goroutines left", n-before)
		}
	})
	return func() *net.TCPConn {
		t.Helper()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		t.Cleanup(func() { c.Close() })
		return c.(*net.TCPConn)
	}
}

func TestBulkDigest(t *testing.T) {
	counts := make(chan int64, 4)
	dial := serve(t, func(c *net.TCPConn) {
		n, err := workload.Digest(c)
		if err != nil {
			t.Error(err)
		}
		counts <- n
	})
	data := make([]byte, 1<<20+123) // not a multiple of any chunk below
	rng := rand.New(rand.NewPCG(1, 1))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	for _, chunk := range []int{1000, 64 << 10, 4 << 20} {
		got, err := workload.Bulk(dial(), data, chunk)
		if err != nil {
			t.Fatalf("chunk %d: %v", chunk, err)
		}
		if got != sha256.Sum256(data) {
			t.Fatalf("chunk %d: the digest differs", chunk)
		}
		if n := <-counts; n != int64(len(data)) {
			t.Fatalf("chunk %d: the server read %d bytes, want %d", chunk, n, len(data))
		}
	}
}

func TestBulkErrors(t *testing.T) {
	dial := serve(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, c)
		c.Write([]byte("short")) // not a digest
	})
	if _, err := workload.Bulk(dial(), []byte("x"), 0); err == nil {
		t.Error("chunk 0: no error")
	}
	if _, err := workload.Bulk(dial(), []byte("abc"), 2); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("a 5-byte reply: %v, want io.ErrUnexpectedEOF", err)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go io.Copy(io.Discard, b)
	if _, err := workload.Bulk(a, []byte("abc"), 2); !errors.Is(err, workload.ErrNoHalfClose) {
		t.Errorf("a pipe: %v, want ErrNoHalfClose", err)
	}
}

func TestPingPong(t *testing.T) {
	echoed := make(chan int64, 1)
	dial := serve(t, func(c *net.TCPConn) {
		n, _ := io.Copy(c, c)
		echoed <- n
	})
	el, err := workload.PingPong(dial(), 64, 3, 20)
	if err != nil {
		t.Fatal(err)
	}
	if el <= 0 {
		t.Errorf("elapsed %v", el)
	}
	if n := <-echoed; n != 64*23 {
		t.Errorf("the server echoed %d bytes, want %d", n, 64*23)
	}
}

func TestPingPongErrors(t *testing.T) {
	// An echo that flips a bit of the fifth message.
	dial := serve(t, func(c *net.TCPConn) {
		buf := make([]byte, 16)
		for i := 0; ; i++ {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if i == 4 {
				buf[9] ^= 1
			}
			c.Write(buf)
		}
	})
	if _, err := workload.PingPong(dial(), 16, 2, 10); !errors.Is(err, workload.ErrMismatch) {
		t.Errorf("a corrupted echo: %v, want ErrMismatch", err)
	}
	for _, tc := range []struct{ size, warm, rounds int }{{1, 0, 1}, {0, 0, 1}, {16, -1, 1}, {16, 0, 0}} {
		if _, err := workload.PingPong(dial(), tc.size, tc.warm, tc.rounds); err == nil {
			t.Errorf("%+v: no error", tc)
		}
	}
}

package vsocktest_test

import (
	"bytes"
	"testing"

	"github.com/vsdp/vsdp/vhost/vsock/vsocktest"
)

func TestQueue(t *testing.T) {
	for _, tc := range []struct {
		name   string
		in     [][]byte
		dst    []int // sizes of Fill's buffers
		filled int
		got    string // what the buffers hold, concatenated
		left   int
	}{
		{"empty", nil, []int{4}, 0, "", 0},
		{"no buffers", [][]byte{[]byte("abc")}, nil, 0, "", 3},
		{"exact", [][]byte{[]byte("ab"), []byte("cd")}, []int{4}, 4, "abcd", 0},
		{"across buffers", [][]byte{[]byte("abcdef")}, []int{2, 0, 3}, 5, "abcde", 1},
		{"short queue", [][]byte{[]byte("ab")}, []int{1, 4}, 2, "ab", 0},
		{"empty segments", [][]byte{{}, []byte("x"), {}}, []int{8}, 1, "x", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var q vsocktest.Queue
			q.Append(tc.in...)
			dst := make([][]byte, len(tc.dst))
			for i, n := range tc.dst {
				dst[i] = make([]byte, n)
			}
			n := q.Fill(dst)
			if n != tc.filled || q.Len() != tc.left {
				t.Fatalf("Fill moved %d, %d left; want %d, %d left", n, q.Len(), tc.filled, tc.left)
			}
			var got []byte
			rest := n
			for _, d := range dst {
				k := min(len(d), rest)
				got = append(got, d[:k]...)
				rest -= k
			}
			if !bytes.Equal(got, []byte(tc.got)) {
				t.Fatalf("buffers hold %q, want %q", got, tc.got)
			}
		})
	}
	// Bytes left behind come out next, in order.
	var q vsocktest.Queue
	q.Append([]byte("hello"), []byte(" world"))
	a, b := make([]byte, 3), make([]byte, 20)
	q.Fill([][]byte{a})
	n := q.Fill([][]byte{b})
	if string(a) != "hel" || string(b[:n]) != "lo world" || q.Len() != 0 {
		t.Fatalf("two fills: %q then %q, %d left", a, b[:n], q.Len())
	}
}

package leakcheck

import (
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// recorder is a testing.TB that only records Errorf.
type recorder struct {
	testing.TB
	mu   sync.Mutex
	errs []string
}

func (r *recorder) Helper() {}
func (r *recorder) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, format)
}

func TestCheck(t *testing.T) {
	t.Run("clean", func(t *testing.T) {
		s := Take()
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		r := &recorder{TB: t}
		s.Check(r)
		if len(r.errs) != 0 {
			t.Fatalf("a closed file counted as a leak: %v", r.errs)
		}
	})
	t.Run("leaked fd", func(t *testing.T) {
		s := Take()
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		r := &recorder{TB: t}
		s.check(r, 50*time.Millisecond)
		if len(r.errs) != 1 || !strings.HasPrefix(r.errs[0], "leak:") {
			t.Fatalf("an open file was not reported: %v", r.errs)
		}
		if !strings.Contains(openTargets(), os.DevNull) {
			t.Fatal("the open file is not among the descriptors")
		}
	})
}

func openTargets() string {
	var b strings.Builder
	for k := range openFDs() {
		b.WriteString(k + "\n")
	}
	return b.String()
}

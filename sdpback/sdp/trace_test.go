package sdp_test

import (
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/vsdp/vsdp/sdpback/sdp"
)

// phases records a stack's set-up phases (sdp.SetTrace): each "dial" or
// "request" starts a new connection's record.
type phases struct {
	mu   sync.Mutex
	recs [][]phaseAt
}

type phaseAt struct {
	name string
	at   time.Time
}

func tracePhases(s *sdp.Stack) *phases {
	p := &phases{}
	sdp.SetTrace(s, p.mark)
	return p
}

func (p *phases) mark(name string) {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	if name == "dial" || name == "request" || len(p.recs) == 0 {
		p.recs = append(p.recs, nil)
	}
	p.recs[len(p.recs)-1] = append(p.recs[len(p.recs)-1], phaseAt{name, now})
}

// reset forgets what was recorded.
func (p *phases) reset() {
	p.mu.Lock()
	p.recs = nil
	p.mu.Unlock()
}

// sums returns, per phase, the total time from the previous phase's end,
// over every complete record, and how many records there were.
func (p *phases) sums() (map[string]time.Duration, []string, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	sum := map[string]time.Duration{}
	var order []string
	n := 0
	for _, r := range p.recs {
		if len(r) < 2 || r[len(r)-1].name != "started" {
			continue
		}
		n++
		for i := 1; i < len(r); i++ {
			if _, ok := sum[r[i].name]; !ok {
				order = append(order, r[i].name)
			}
			sum[r[i].name] += r[i].at.Sub(r[i-1].at)
		}
	}
	return sum, order, n
}

// lines formats each record as "phase +Δ" steps.
func (p *phases) lines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, r := range p.recs {
		var b strings.Builder
		for i, e := range r {
			if i == 0 {
				b.WriteString(e.name)
				continue
			}
			fmt.Fprintf(&b, " %s+%v", e.name, e.at.Sub(r[i-1].at).Round(time.Microsecond))
		}
		fmt.Fprintf(&b, " (total %v)", r[len(r)-1].at.Sub(r[0].at).Round(time.Microsecond))
		out = append(out, b.String())
	}
	return out
}

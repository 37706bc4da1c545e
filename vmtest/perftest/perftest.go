package perftest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/vsdp/vsdp/vmtest"
)

// ErrNoRow means the tool's output has no result row for the size asked.
var ErrNoRow = errors.New("perftest: no result row")

// Connection retries of the client while the server is not listening yet.
const (
	connectTries = 20
	connectPause = 300 * time.Millisecond
)

// Run runs a perftest tool (args[0], with its arguments but without the
// server address) with its server in f.Guests[1] and its client in
// f.Guests[0], and returns parse applied to the client's standard output.
//
// perftest itself sometimes stalls on soft-RoCE under TCG (seen once in
// CI: ib_send_lat -e made no progress for a minute while our own event-mode
// ping-pong on the same link had just finished). A run that times out or
// reports 0 is therefore tried once more, on another TCP port (retryPortShift
// above the one given with -p) so that the killed server's socket cannot be
// in the way; the error after two failures carries both outputs.
func Run(ctx context.Context, f *vmtest.Fabric, args []string, parse func(out string) (float64, error)) (float64, error) {
	if len(args) == 0 {
		return 0, errors.New("perftest: no tool named")
	}
	var first error
	for attempt := 0; attempt < 2; attempt++ {
		if attempt > 0 {
			var err error
			if args, err = shiftPort(args, retryPortShift); err != nil {
				return 0, fmt.Errorf("%w (first try: %v)", err, first)
			}
		}
		v, retry, err := runOnce(ctx, f, args, parse)
		switch {
		case err == nil && v > 0:
			return v, nil
		case err == nil:
			err = fmt.Errorf("%s reported 0", args[0])
			retry = true
		}
		if !retry || ctx.Err() != nil {
			return 0, err
		}
		if first != nil {
			return 0, fmt.Errorf("%s failed twice: %w\nfirst try: %v", args[0], err, first)
		}
		first = err
	}
	return 0, first // not reached
}

// runTimeout bounds one run of a tool, server and client each. The runs
// the tests ask for take a few seconds under TCG.
const runTimeout = 30 * time.Second

// retryPortShift moves a retried run's TCP port out of the way of the
// first one's.
const retryPortShift = 500

// runOnce is one run; retry says whether the failure is one a second run
// may not repeat (a timeout).
func runOnce(ctx context.Context, f *vmtest.Fabric, args []string, parse func(out string) (float64, error)) (v float64, retry bool, err error) {
	a, b := f.Guests[0], f.Guests[1]
	client := append(append([]string(nil), args...), f.IPs[1])
	srv, err := b.Start(ctx, vmtest.Cmd{Args: args, Timeout: runTimeout})
	if err != nil {
		return 0, false, err
	}
	var r *vmtest.Result
	for try := 0; try < connectTries; try++ {
		time.Sleep(connectPause)
		r, err = a.Exec(ctx, vmtest.Cmd{Args: client, Timeout: runTimeout})
		if err != nil || r.ExitCode == 0 || !strings.Contains(string(r.Stdout)+string(r.Stderr), "Couldn't connect") {
			break
		}
	}
	srv.Stop(ctx) //nolint:errcheck // the server has done its part, or the client's error says why not
	if err != nil {
		return 0, false, err
	}
	if err := r.Err(); err != nil {
		return 0, r.TimedOut, fmt.Errorf("%w\n%s%s", err, r.Stdout, r.Stderr)
	}
	v, err = parse(string(r.Stdout))
	if err != nil {
		return 0, false, fmt.Errorf("%w\n%s", err, r.Stdout)
	}
	return v, false, nil
}

// shiftPort returns a copy of args with the value of -p moved by delta.
func shiftPort(args []string, delta int) ([]string, error) {
	out := append([]string(nil), args...)
	for i := 0; i+1 < len(out); i++ {
		if out[i] == "-p" {
			p, err := strconv.Atoi(out[i+1])
			if err != nil || p+delta <= 0 || p+delta > 65535 {
				return nil, fmt.Errorf("perftest: cannot move port %q by %d", out[i+1], delta)
			}
			out[i+1] = strconv.Itoa(p + delta)
			return out, nil
		}
	}
	return nil, errors.New("perftest: no -p port to move")
}

// Field returns field col (from 0) of the result row for size-byte
// messages: the first row whose first field is size, whose second is an
// iteration count, and which has at least width fields.
func Field(out string, size, width, col int) (float64, error) {
	if col < 0 || col >= width {
		return 0, fmt.Errorf("perftest: field %d of a %d-field row", col, width)
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= width && f[0] == strconv.Itoa(size) {
			if _, err := strconv.Atoi(f[1]); err == nil {
				return strconv.ParseFloat(f[col], 64)
			}
		}
	}
	return 0, fmt.Errorf("%w for %d-byte messages", ErrNoRow, size)
}

// BW returns the average bandwidth of a bandwidth tool's row ("#bytes
// #iterations BW-peak BW-average MsgRate") for size: MB/sec, where
// perftest's MB is 2^20 bytes.
func BW(out string, size int) (float64, error) { return Field(out, size, 5, 3) }

// Lat returns t_avg of a latency tool's row ("#bytes #iterations t_min
// t_max t_typical t_avg ...") for size: half the average round trip, in µs.
func Lat(out string, size int) (float64, error) { return Field(out, size, 7, 5) }

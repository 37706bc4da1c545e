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
func Run(ctx context.Context, f *vmtest.Fabric, args []string, parse func(out string) (float64, error)) (float64, error) {
	if len(args) == 0 {
		return 0, errors.New("perftest: no tool named")
	}
	a, b := f.Guests[0], f.Guests[1]
	client := append(append([]string(nil), args...), f.IPs[1])
	for attempt := 0; ; attempt++ {
		srv, err := b.Start(ctx, vmtest.Cmd{Args: args, Timeout: time.Minute})
		if err != nil {
			return 0, err
		}
		var r *vmtest.Result
		for try := 0; try < connectTries; try++ {
			time.Sleep(connectPause)
			r, err = a.Exec(ctx, vmtest.Cmd{Args: client, Timeout: time.Minute})
			if err != nil || r.ExitCode == 0 || !strings.Contains(string(r.Stdout)+string(r.Stderr), "Couldn't connect") {
				break
			}
		}
		srv.Stop(ctx) //nolint:errcheck // the server has done its part, or the client's error says why not
		if err != nil {
			return 0, err
		}
		if err := r.Err(); err != nil {
			return 0, fmt.Errorf("%w\n%s%s", err, r.Stdout, r.Stderr)
		}
		v, err := parse(string(r.Stdout))
		if err != nil {
			return 0, fmt.Errorf("%w\n%s", err, r.Stdout)
		}
		if v > 0 || attempt > 0 {
			if v == 0 {
				return 0, fmt.Errorf("%s reported 0 twice", args[0])
			}
			return v, nil
		}
	}
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

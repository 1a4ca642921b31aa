package launch

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestFind(t *testing.T) {
	if _, err := Find("/nonexistent/helper", "helper"); err == nil {
		t.Fatal("a missing configured path was accepted")
	}
	if p, err := Find("", "sh"); err != nil || !strings.HasSuffix(p, "/sh") {
		t.Fatalf("PATH lookup: %q %v", p, err)
	}
	if _, err := Find("", "kuasar-no-such-helper"); err == nil || !strings.Contains(err.Error(), "not found beside the daemon or on PATH") {
		t.Fatalf("missing helper: %v", err)
	}
}

func TestDetached(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "up")
	ctx := context.Background()
	// A helper that becomes ready, then exits (we end only what we started).
	err := Detached(ctx, Spec{Binary: "/bin/sh", Args: []string{"-c", "touch " + marker + "; sleep 0.2"}, LogPath: filepath.Join(dir, "log")},
		func(context.Context) error {
			if _, err := os.Stat(marker); err != nil {
				return err
			}
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	// One that exits before it is ready is reported at once.
	begin := time.Now()
	err = Detached(ctx, Spec{Binary: "/bin/sh", Args: []string{"-c", "exit 3"}, LogPath: filepath.Join(dir, "log")},
		func(context.Context) error { return errors.New("not ready") })
	if err == nil || !strings.Contains(err.Error(), "exited at start") || time.Since(begin) > 5*time.Second {
		t.Fatalf("helper exiting at start: %v", err)
	}
}

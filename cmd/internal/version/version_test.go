package version

import (
	"bytes"
	"strings"
	"testing"
)

func TestFprintNamesBothVersions(t *testing.T) {
	var b bytes.Buffer
	Fprint(&b)
	out := b.String()
	for _, want := range []string{Name, Version, "containerd", Containerd()} {
		if !strings.Contains(out, want) {
			t.Errorf("version banner %q does not mention %q", out, want)
		}
	}
}

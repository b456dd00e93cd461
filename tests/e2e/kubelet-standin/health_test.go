package main

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	drahealthv1alpha1 "k8s.io/kubelet/pkg/apis/dra-health/v1alpha1"
)

// alphaHealth is a plugin that serves only the v1alpha1 health service: one report per
// value sent on reports, the stream ends when reports is closed.
type alphaHealth struct {
	drahealthv1alpha1.UnimplementedDRAResourceHealthServer
	reports chan *drahealthv1alpha1.NodeWatchResourcesResponse
}

func (a alphaHealth) NodeWatchResources(_ *drahealthv1alpha1.NodeWatchResourcesRequest,
	stream grpc.ServerStreamingServer[drahealthv1alpha1.NodeWatchResourcesResponse]) error {
	for report := range a.reports {
		if err := stream.Send(report); err != nil {
			return err
		}
	}
	return nil
}

func alphaReport(health drahealthv1alpha1.HealthStatus, message string, timeout int64) *drahealthv1alpha1.NodeWatchResourcesResponse {
	return &drahealthv1alpha1.NodeWatchResourcesResponse{Devices: []*drahealthv1alpha1.DeviceHealth{{
		Device: &drahealthv1alpha1.DeviceIdentifier{PoolName: "node-a", DeviceName: "gpu-0"},
		Health: health, Message: message, HealthCheckTimeoutSeconds: timeout}}}
}

// A plugin with only the alpha health service is watched through the kubelet's converting
// wrapper; a device whose last report is older than its timeout reads Unknown, and the
// driver's devices are forgotten when its stream ends.
func TestHealthCacheFollowsAnAlphaStreamWithTheKubeletsRules(t *testing.T) {
	dir := t.TempDir()
	endpoint := filepath.Join(dir, "dra.sock")
	plugin := alphaHealth{reports: make(chan *drahealthv1alpha1.NodeWatchResourcesResponse)}
	server := grpc.NewServer()
	drahealthv1alpha1.RegisterDRAResourceHealthServer(server, plugin)
	listener, err := net.Listen("unix", endpoint)
	if err != nil {
		t.Fatal(err)
	}
	go server.Serve(listener) //nolint:errcheck // ends with Stop
	t.Cleanup(server.Stop)
	status, err := newStatusDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cache := newHealthCache(ctx, status)
	cache.watch("gpu.example.com", endpoint, []string{"v1beta1.DRAPlugin", drahealthv1alpha1.DRAResourceHealthService})

	view := func(want string) func() (healthView, bool) {
		return func() (healthView, bool) {
			v, ok := readJSON[healthView](filepath.Join(dir, "health.json"))
			return v, ok && len(v.Devices) == 1 && v.Devices[0].Health == want
		}
	}
	plugin.reports <- alphaReport(drahealthv1alpha1.HealthStatus_UNHEALTHY, "XID 79", 1)
	got := waitFor(t, "gpu-0 Unhealthy", view("Unhealthy"))
	if got.Streams["gpu.example.com"] != drahealthv1alpha1.DRAResourceHealthService || got.Devices[0].Message != "XID 79" {
		t.Fatalf("health.json: %+v", got)
	}
	if got = waitFor(t, "gpu-0 Unknown after its 1 s timeout", view("Unknown")); got.Devices[0].Message != "" {
		t.Fatalf("a stale device keeps no message: %+v", got)
	}
	plugin.reports <- alphaReport(drahealthv1alpha1.HealthStatus_HEALTHY, "", 0)
	if got = waitFor(t, "gpu-0 Healthy", view("Healthy")); got.Devices[0].TimeoutSeconds != 30 {
		t.Fatalf("an unset timeout is the kubelet's 30 s: %+v", got)
	}
	close(plugin.reports)
	waitFor(t, "the driver forgotten when its stream ends", func() (healthView, bool) {
		v, ok := readJSON[healthView](filepath.Join(dir, "health.json"))
		return v, ok && len(v.Devices) == 0 && len(v.Streams) == 0
	})
}

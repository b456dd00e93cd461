package main

import (
	"context"
	"errors"
	"io"
	"maps"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"
	drahealthv1 "k8s.io/kubelet/pkg/apis/dra-health/v1"
	drahealthv1alpha1 "k8s.io/kubelet/pkg/apis/dra-health/v1alpha1"
)

// The kubelet's rules for device health (pkg/kubelet/cm/dra/healthinfo.go and
// plugin/dra_plugin_manager.go in v1.37.2), which the kubelet keeps private, so the
// stand-in applies them to a stream of its own: the newest health service both sides
// know (v1, else v1alpha1 through the kubelet's converting wrapper), a stream retried
// every 5 s, a device not reported within its health_check_timeout_seconds (30 s when
// unset) reads Unknown, and a driver's devices are forgotten when its stream ends.
const (
	defaultHealthTimeout = 30 * time.Second
	healthRetryPeriod    = 5 * time.Second
	healthRecheckPeriod  = time.Second
)

var healthServices = []string{drahealthv1.DRAResourceHealthService, drahealthv1alpha1.DRAResourceHealthService}

type deviceHealth struct {
	Driver  string `json:"driver"`
	Pool    string `json:"pool"`
	Device  string `json:"device"`
	Health  string `json:"health"` // Healthy, Unhealthy or Unknown, as in a pod's allocatedResourcesStatus
	Message string `json:"message,omitempty"`
	// TimeoutSeconds: how long the report holds before the device reads Unknown.
	TimeoutSeconds int64 `json:"timeoutSeconds"`

	updated time.Time
}

// healthView is health.json: the service each driver's stream uses and every device's
// health as the kubelet would read it now.
type healthView struct {
	Streams map[string]string `json:"streams"`
	Devices []deviceHealth    `json:"devices"`
}

type healthCache struct {
	ctx    context.Context
	status *statusDir

	mu      sync.Mutex
	devices map[string]deviceHealth       // driver/pool/device
	streams map[string]string             // driver -> health service of its open stream
	cancel  map[string]context.CancelFunc // plugin endpoint -> its watch
	written *healthView
}

// newHealthCache watches the health of every driver registered with it until ctx ends.
func newHealthCache(ctx context.Context, status *statusDir) *healthCache {
	c := &healthCache{ctx: ctx, status: status, devices: map[string]deviceHealth{},
		streams: map[string]string{}, cancel: map[string]context.CancelFunc{}}
	c.write()
	go wait.UntilWithContext(ctx, func(context.Context) { c.write() }, healthRecheckPeriod)
	return c
}

// watch opens the health stream of the plugin at endpoint, if the services it offered
// include one, replacing any earlier watch of that endpoint.
func (c *healthCache) watch(driver, endpoint string, offered []string) {
	service := ""
	for _, s := range healthServices {
		if slices.Contains(offered, s) {
			service = s
			break
		}
	}
	c.unwatch(endpoint)
	if service == "" {
		return
	}
	conn, err := grpc.NewClient("unix:"+endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		klog.ErrorS(err, "Health stream: no gRPC client", "driver", driver, "endpoint", endpoint)
		return
	}
	ctx, cancel := context.WithCancel(c.ctx)
	c.mu.Lock()
	c.cancel[endpoint] = cancel
	c.mu.Unlock()
	go func() {
		defer conn.Close() //nolint:errcheck // nothing to do about it
		wait.UntilWithContext(ctx, func(ctx context.Context) {
			err := c.follow(ctx, conn, driver, service)
			klog.V(2).InfoS("Health stream ended", "driver", driver, "service", service, "err", err)
			if status.Code(err) == codes.Unimplemented {
				cancel() // as the kubelet: a driver that gains support registers again
			}
		}, healthRetryPeriod)
	}()
}

func (c *healthCache) unwatch(endpoint string) {
	c.mu.Lock()
	cancel := c.cancel[endpoint]
	delete(c.cancel, endpoint)
	c.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// follow reads one stream until it ends; the driver's devices are forgotten then.
func (c *healthCache) follow(ctx context.Context, conn *grpc.ClientConn, driver, service string) error {
	var stream drahealthv1.DRAResourceHealth_NodeWatchResourcesClient
	var err error
	if service == drahealthv1.DRAResourceHealthService {
		stream, err = drahealthv1.NewDRAResourceHealthClient(conn).NodeWatchResources(ctx, &drahealthv1.NodeWatchResourcesRequest{})
	} else {
		stream, err = drahealthv1.V1Alpha1ClientWrapper{Client: drahealthv1alpha1.NewDRAResourceHealthClient(conn)}.
			NodeWatchResources(ctx, &drahealthv1.NodeWatchResourcesRequest{})
	}
	if err != nil {
		return err
	}
	defer c.forget(driver)
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		c.update(driver, service, resp.GetDevices())
	}
}

func (c *healthCache) update(driver, service string, reported []*drahealthv1.DeviceHealth) {
	now := time.Now()
	c.mu.Lock()
	c.streams[driver] = service
	for _, d := range reported {
		timeout := int64(defaultHealthTimeout / time.Second)
		if seconds := d.GetHealthCheckTimeoutSeconds(); seconds > 0 {
			timeout = seconds
		}
		entry := deviceHealth{Driver: driver, Pool: d.GetDevice().GetPoolName(),
			Device: d.GetDevice().GetDeviceName(), Health: healthName(d.GetHealth()),
			Message: d.GetMessage(), TimeoutSeconds: timeout, updated: now}
		c.devices[driver+"/"+entry.Pool+"/"+entry.Device] = entry
	}
	c.mu.Unlock()
	c.write()
}

func (c *healthCache) forget(driver string) {
	c.mu.Lock()
	delete(c.streams, driver)
	maps.DeleteFunc(c.devices, func(_ string, d deviceHealth) bool { return d.Driver == driver })
	c.mu.Unlock()
	c.write()
}

func healthName(h drahealthv1.HealthStatus) string {
	switch h {
	case drahealthv1.HealthStatus_HEALTHY:
		return "Healthy"
	case drahealthv1.HealthStatus_UNHEALTHY:
		return "Unhealthy"
	default:
		return "Unknown"
	}
}

// write replaces health.json when what a reader would see has changed (a report, or a
// device whose last report is older than its timeout).
func (c *healthCache) write() {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	view := healthView{Streams: maps.Clone(c.streams), Devices: []deviceHealth{}}
	for _, key := range slices.Sorted(maps.Keys(c.devices)) {
		d := c.devices[key]
		if now.Sub(d.updated) > time.Duration(d.TimeoutSeconds)*time.Second {
			d.Health, d.Message = "Unknown", ""
		}
		d.updated = time.Time{}
		view.Devices = append(view.Devices, d)
	}
	if c.written != nil && maps.Equal(view.Streams, c.written.Streams) &&
		slices.Equal(view.Devices, c.written.Devices) {
		return
	}
	c.written = &view
	c.status.write("health.json", view)
}

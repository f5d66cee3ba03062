--
-- 06_distance: haversine_km() and geoscore() against distances computed
-- independently (haversine on a 6371 km sphere, by hand):
--   Paris (48.8566, 2.3522) - London (51.5074, -0.1278)    343.556060 km
--   Paris - New York (40.7128, -74.0060)                   5837.240904 km
--   London - Sydney (-33.8688, 151.2093)                  16993.933460 km
--   antipodes: pi x 6371 = 20015.086796 km; a quarter circle 10007.543398 km
--   GeoScore = 5000 exp(-d / 1492.7): Paris-London 3972.042473,
--   d = 1492.7 km gives 5000 / e = 1839.397206
--
CREATE TEMP TABLE city (name text, loc geography);
INSERT INTO city VALUES
	('paris', 'SRID=4326;POINT(2.3522 48.8566)'),
	('london', 'SRID=4326;POINT(-0.1278 51.5074)'),
	('new york', 'SRID=4326;POINT(-74.0060 40.7128)'),
	('sydney', 'SRID=4326;POINT(151.2093 -33.8688)');
CREATE FUNCTION pg_temp.km(a text, b text) RETURNS float8
LANGUAGE sql AS $$
	SELECT haversine_km(x.loc, y.loc) FROM city x, city y WHERE x.name = a AND y.name = b
$$;

SELECT abs(pg_temp.km('paris', 'london') - 343.556060) < 1e-6 AS paris_london,
	   abs(pg_temp.km('paris', 'new york') - 5837.240904) < 1e-6 AS paris_new_york,
	   abs(pg_temp.km('london', 'sydney') - 16993.933460) < 1e-6 AS london_sydney,
	   pg_temp.km('london', 'paris') = pg_temp.km('paris', 'london') AS symmetric,
	   pg_temp.km('sydney', 'sydney') = 0 AS same_point;
SELECT abs(haversine_km('POINT(0 0)', 'POINT(180 0)') - 20015.086796) < 1e-6 AS antipodes,
	   -- (haversine is ill-conditioned at antipodes: asin near 1 loses ~1e-8 rad)
	   abs(haversine_km('POINT(-90 10)', 'POINT(90 -10)') - 20015.086796) < 1e-3 AS antipodes_off_equator,
	   abs(haversine_km('POINT(0 0)', 'POINT(0 90)') - 10007.543398) < 1e-6 AS equator_to_pole,
	   abs(haversine_km('POINT(179.5 0)', 'POINT(-179.5 0)') - 111.194927) < 1e-6 AS across_antimeridian;

-- the sphere's radius is 6371 km, not PostGIS's 6371.0088 km mean radius
SELECT round((ST_Distance(x.loc, y.loc, false) / 1000 / haversine_km(x.loc, y.loc))::numeric, 8) AS postgis_ratio
FROM city x, city y WHERE x.name = 'paris' AND y.name = 'london';

SELECT abs(geoscore(x.loc, y.loc) - 3972.042473) < 1e-6 AS paris_london,
	   geoscore(x.loc, x.loc) = 5000 AS perfect
FROM city x, city y WHERE x.name = 'paris' AND y.name = 'london';
SELECT abs(geoscore('POINT(0 0)', ST_MakePoint(degrees(1492.7 / 6371), 0)::geography) - 1839.397206) < 1e-6 AS one_scale;

-- only points make sense
SELECT haversine_km('LINESTRING(0 0, 1 1)', 'POINT(0 0)');
